"""Tests of llama_jax.train: parity with transformers, overfitting, gradient accumulation, LoRA, checkpoints,
SIGKILL/resume, a sharded step on 8 fake devices."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from llama_jax import data, train
from llama_jax.config import LlamaConfig
from tests.conftest import keep_kernel_flags
from tests.numerics import relative_tolerance

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = LlamaConfig(
    vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=128, rope_theta=10000.0
)


def _rows(seed=0, n_docs=6, seq_len=16, vocab=64):
    rng = np.random.default_rng(seed)
    docs = [(rng.integers(1, vocab, size=int(rng.integers(5, 30))).astype(np.int32), None) for _ in range(n_docs)]
    return data.pack_documents([(t, np.ones(len(t), np.float32)) for t, _ in docs], seq_len)


# ------------------------------------------------------------------------------------------------ transformers parity
def _to_torch_state(params, cfg):
    import torch

    from conversions.hf import OURS_TO_HF
    from tests.reference import to_torch_state_dict

    sd = to_torch_state_dict(jax.tree.map(np.asarray, params), cfg, OURS_TO_HF)
    return {k: torch.tensor(v) for k, v in sd.items()}


def _from_torch_grads(hf, cfg):
    from conversions.hf import OURS_TO_HF
    from tests.reference import from_torch_state_dict

    flat = from_torch_state_dict({k: v.grad.detach().numpy() for k, v in hf.named_parameters()}, cfg, OURS_TO_HF)
    out = {}
    for name, w in flat.items():
        node = out
        *parents, leaf = name.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = w
    return out


def test_loss_and_gradients_match_transformers():
    import torch
    import transformers

    cfg = TINY
    model = train.host_random_model(cfg, seed=3, param_dtype=jnp.float32)
    graphdef, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    # non-trivial norm scales so their gradients are tested too
    key = jax.random.PRNGKey(7)
    params["layers"]["attention_norm"]["scale"] = 1 + 0.1 * jax.random.normal(key, (cfg.n_layers, cfg.dim))
    params["final_norm"]["scale"] = 1 + 0.1 * jax.random.normal(jax.random.fold_in(key, 1), (cfg.dim,))
    rng = np.random.default_rng(0)
    b, t = 3, 12
    seq = rng.integers(0, cfg.vocab_size, size=(b, t + 1)).astype(np.int32)
    mask = (rng.random((b, t)) > 0.25).astype(np.float32)
    batch = dict(
        tokens=seq[:, :-1],
        targets=seq[:, 1:],
        loss_mask=mask,
        positions=np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)),
        segment_ids=np.ones((b, t), np.int32),
    )
    loss, grads = jax.value_and_grad(lambda p: train.loss_fn(graphdef, p, batch))(params)

    hf_cfg = transformers.LlamaConfig(**cfg.to_hf_config())
    hf_cfg._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(hf_cfg).float()
    missing, unexpected = hf.load_state_dict(_to_torch_state(params, cfg), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    labels = torch.tensor(seq, dtype=torch.long)
    labels[:, 1:][torch.tensor(mask) == 0] = -100
    labels[:, 0] = -100
    out = hf(input_ids=torch.tensor(seq, dtype=torch.long), labels=labels)
    out.loss.backward()
    ref_loss = float(out.loss.detach())
    # 1e-4 relative: 18x float32 rounding of forward + backward (2L deep) at D 32 (tests/numerics.py), far under a
    # wrong gradient or mask (>= 1e-2)
    assert abs(float(loss) - ref_loss) <= 1e-4 * abs(ref_loss), (float(loss), ref_loss)
    ref = _from_torch_grads(hf, cfg)
    flat_ours = train._flatten_paths(grads)
    flat_ref = train._flatten_paths(ref)
    assert set(flat_ours) == set(flat_ref)
    for name in flat_ours:
        ours, theirs = np.asarray(flat_ours[name]), flat_ref[name]
        rel = np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)
        assert rel <= 1e-4, (name, rel)


# ------------------------------------------------------------------------------------------------ training
def test_overfits_four_sequences_and_accumulation_equals_big_batch():
    rows = _rows(seed=1, n_docs=4, seq_len=16)
    rows = {k: v[:4] for k, v in rows.items()}
    cfg = train.TrainConfig(
        learning_rate=1e-2, warmup_steps=5, total_steps=150, weight_decay=0.01, clip_norm=1.0, grad_accum=2
    )
    trainer = train.Trainer(train.host_random_model(TINY), cfg)
    big = train.Trainer(train.host_random_model(TINY), dataclasses.replace(cfg, grad_accum=1))
    accum_batch = {k: v.reshape(2, 2, *v.shape[1:]) for k, v in rows.items()}  # [A=2, B=2, T]
    big_batch = {k: v[None] for k, v in rows.items()}  # [A=1, B=4, T]
    m1 = trainer.train_step(accum_batch)
    m2 = big.train_step(big_batch)
    assert m1["tokens"] == m2["tokens"] == rows["loss_mask"].sum()
    # batch 2 x 2 vs 4 may tile the matmuls differently: float32 rounding at D, L (tests/numerics.py)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=relative_tolerance(TINY.dim, TINY.n_layers))
    for x, y in zip(jax.tree.leaves(trainer.state["params"]), jax.tree.leaves(big.state["params"]), strict=False):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    first = m1["loss"]
    for _ in range(cfg.total_steps - 1):
        last = trainer.train_step(accum_batch)["loss"]
    assert first > 3.0 and last < 0.1, (first, last)
    s, n = trainer.eval_sums(big_batch)
    assert s / n < 0.1


def test_lora_trains_only_lora_and_merges():
    rows = _rows(seed=2)
    targets = ("q_proj", "v_proj", "o_proj", "down_proj")
    cfg = train.TrainConfig(
        learning_rate=1e-2, total_steps=5, lora_rank=4, lora_alpha=8.0, lora_targets=targets, weight_decay=0.1
    )
    model = train.host_random_model(TINY)
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    trainer = train.Trainer(model, cfg)
    loader = data.Loader(rows, 2, seed=0)
    losses = [trainer.train_step(loader.next())["loss"] for _ in range(5)]
    assert losses[-1] < losses[0]
    # the base is frozen, bit for bit
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(trainer.base), strict=False):
        np.testing.assert_array_equal(x, np.asarray(y))
    lora = jax.tree.map(np.asarray, trainer.state["params"])
    assert set(lora) == set(targets)
    assert all(np.abs(ab["b"]).max() > 0 for ab in lora.values())  # B left zero init
    # the optimizer state holds only LoRA-shaped moments
    adam = [
        s
        for s in jax.tree.leaves(trainer.state["opt_state"], is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState)
    ]
    assert len(adam) == 1
    assert jax.tree.structure(adam[0].mu) == jax.tree.structure(trainer.state["params"])
    n_lora = sum(x.size for x in jax.tree.leaves(lora))
    n_opt = sum(x.size for x in jax.tree.leaves(trainer.state["opt_state"]))
    assert n_opt <= 2 * n_lora + 8
    # merged == base + (alpha / r) A @ B, reshaped per projection; everything else untouched
    merged = jax.tree.map(np.asarray, train.merge_lora(trainer.base, trainer.state["params"], cfg.lora_alpha))
    scale = cfg.lora_alpha / cfg.lora_rank
    att, mlp = before["layers"]["attention"], before["layers"]["mlp"]
    for layer in range(TINY.n_layers):
        for name, w, mw in (
            ("q_proj", att["q_proj"], merged["layers"]["attention"]["q_proj"]),
            ("v_proj", att["v_proj"], merged["layers"]["attention"]["v_proj"]),
            ("o_proj", att["o_proj"], merged["layers"]["attention"]["o_proj"]),
            ("down_proj", mlp["down_proj"], merged["layers"]["mlp"]["down_proj"]),
        ):
            a, b = lora[name]["a"][layer], lora[name]["b"][layer]
            if name == "o_proj":  # [N, H, D]: inputs are (N, H)
                expect = w[layer] + scale * (a @ b).reshape(TINY.n_heads, TINY.head_dim, TINY.dim)
            elif name == "down_proj":  # [F, D]
                expect = w[layer] + scale * (a @ b)
            else:  # [D, K, H]
                expect = w[layer] + scale * (a @ b).reshape(TINY.dim, -1, TINY.head_dim)
            np.testing.assert_allclose(mw[layer], expect, rtol=1e-5, atol=1e-6)
    for name in ("k_proj",):
        np.testing.assert_array_equal(merged["layers"]["attention"][name], att[name])
    np.testing.assert_array_equal(merged["layers"]["mlp"]["gate_proj"], mlp["gate_proj"])
    np.testing.assert_array_equal(merged["embedder"]["embedding"], before["embedder"]["embedding"])
    # the exported model computes what the trainer trained
    exported = trainer.export_model()
    batch = {k: v[:2] for k, v in rows.items()}
    s, n = trainer.eval_sums(batch)
    g, st = nnx.split(exported, nnx.Param)
    np.testing.assert_allclose(float(train.loss_fn(g, nnx.to_pure_dict(st), batch)), s / n, rtol=1e-5)


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="lora_targets"):
        train.TrainConfig(lora_targets=("qq_proj",))
    with pytest.raises(ValueError, match="grad_accum"):
        train.TrainConfig(grad_accum=0)


def test_checkpoint_from_another_shape_is_refused(tmp_path):
    t1 = train.Trainer(train.host_random_model(TINY), train.TrainConfig(total_steps=5))
    ck = train.Checkpointer(tmp_path / "ck", save_every=1)
    ck.save(0, t1.state, {"data": {"epoch": 0, "cursor": 0, "seed": 0}}, force=True)
    ck.wait()
    t2 = train.Trainer(train.host_random_model(TINY.replace(hidden_dim=40)), train.TrainConfig(total_steps=5))
    with pytest.raises(
        ValueError,
        match=r"parameter 'params\.layers\.mlp\.down_proj' has shape \(2, 48, 32\), "
        r"the model expects \(2, 40, 32\)",
    ):
        ck.restore(0, t2.state)
    t3 = train.Trainer(train.host_random_model(TINY), train.TrainConfig(total_steps=5, lora_rank=2))
    with pytest.raises(ValueError, match="parameter 'params.q_proj.a'.*missing"):
        ck.restore(0, t3.state)
    state, meta = ck.restore(0, t1.state)  # the right shape restores
    assert meta["data"]["cursor"] == 0
    ck.close()


# ------------------------------------------------------------------------------------------------ SIGKILL / resume
RUN = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    from flax import nnx
    from llama_jax import data, train
    from llama_jax.config import LlamaConfig
    from llama_jax.model import Llama
    ckpt, metrics, steps, delay = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    cfg = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=128)
    rng = np.random.default_rng(0)
    docs = [(rng.integers(1, 64, size=int(rng.integers(5, 40))).astype(np.int32),) for _ in range(30)]
    rows = data.pack_documents([(d[0], np.ones(len(d[0]), np.float32)) for d in docs], 16)
    loader = data.Loader(rows, 2, grad_accum=2, seed=3)
    trainer = train.Trainer(train.host_random_model(cfg), train.TrainConfig(
        learning_rate=3e-3, warmup_steps=3, total_steps=steps, weight_decay=0.1, grad_accum=2, seed=1))
    ck = train.Checkpointer(ckpt, save_every=3, keep=2) if ckpt != "-" else None
    out = train.fit(trainer, loader, steps, checkpointer=ck, metrics_path=metrics,
                    on_step=lambda s, r: time.sleep(delay))
    print("RESULT", json.dumps(out))
""")


def _run_env(cache):
    env = dict(
        os.environ,
        PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        JAX_PLATFORMS="cpu",
    )
    keep_kernel_flags(env)
    return env


def _run(args, env):
    res = subprocess.run(
        [sys.executable, "-c", RUN, *map(str, args)], env=env, timeout=300, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.split("RESULT", 1)[1])


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _popen(args, env):
    return subprocess.Popen(
        [sys.executable, "-c", RUN, *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def _wait_records(proc, path, n):
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and len(_records(path)) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run ended (or timed out) before writing {n} metric records")


def test_sigterm_sigkill_and_resume_give_identical_losses(tmp_path):
    steps = 14
    env = _run_env(tmp_path / "jax_cache")  # one compilation shared by the four processes
    ref_metrics = tmp_path / "ref.jsonl"
    _run(["-", ref_metrics, steps, 0], env)
    ref = _records(ref_metrics)
    assert [r["step"] for r in ref] == list(range(1, steps + 1))
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "run.jsonl"

    # 1. SIGTERM: the step in flight finishes, a final checkpoint is saved at that step, clean exit
    proc = _popen([ckpt, metrics, steps, 0.25], env)
    _wait_records(proc, metrics, 3)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    out = json.loads(stdout.split("RESULT", 1)[1])
    assert out["interrupted"] and out["step"] < steps
    saved = sorted(int(p) for p in os.listdir(ckpt) if p.isdigit())
    assert saved[-1] == out["step"]
    assert len(_records(metrics)) == out["step"]

    # 2. resume, then SIGKILL at an arbitrary point (4+ steps later: between checkpoints, maybe mid-save)
    proc = _popen([ckpt, metrics, steps, 0.25], env)
    _wait_records(proc, metrics, out["step"] + 4)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = len(_records(metrics))
    assert out["step"] + 4 <= killed_at < steps

    # 3. resume to the end
    final = _run([ckpt, metrics, steps, 0], env)
    assert final["resumed_from"] is not None and final["resumed_from"] <= killed_at and final["step"] == steps
    got = _records(metrics)
    assert [r["step"] for r in got] == list(range(1, steps + 1))  # nothing lost or duplicated
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]  # exactly (float32 CPU)
    assert [r["grad_norm"] for r in got] == [r["grad_norm"] for r in ref]


# ------------------------------------------------------------------------------------------------ sharded step
SHARDED = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    import jax, numpy as np
    from flax import nnx
    from llama_jax import data, train
    from llama_jax.config import LlamaConfig
    from llama_jax.model import Llama
    cfg = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=128)
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 64, size=int(rng.integers(5, 40))).astype(np.int32) for _ in range(30)]
    rows = data.pack_documents([(d, np.ones(len(d), np.float32)) for d in docs], 16)
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    results = []
    for m in (None, mesh):                  # full fine-tuning: sharded == single device
        t = train.Trainer(train.host_random_model(cfg), train.TrainConfig(learning_rate=3e-3, total_steps=4), mesh=m)
        loader = data.Loader(rows, 4, seed=0)
        results.append([t.train_step(loader.next())["loss"] for _ in range(3)])
    q = t.state["params"]["layers"]["attention"]["q_proj"]
    assert len(q.sharding.device_set) == 8 and q.addressable_shards[0].data.shape == (2, 16, 2, 8), q.sharding
    mu = t.state["opt_state"][1][0].mu["layers"]["mlp"]["gate_proj"]         # Adam moments sharded like params
    assert mu.addressable_shards[0].data.shape == (2, 16, 24), mu.sharding
    np.testing.assert_allclose(results[0], results[1], rtol=2e-5)
    print("OK full", results)
    # LoRA on the mesh: base sharded (FSDP + tensor), factors replicated; trains
    t = train.Trainer(train.host_random_model(cfg), train.TrainConfig(
        learning_rate=1e-2, total_steps=4, lora_rank=2, lora_targets=("q_proj", "gate_proj")), mesh=mesh)
    loader = data.Loader(rows, 4, seed=0)
    batch = loader.next()
    losses = [t.train_step(batch)["loss"] for _ in range(4)]
    assert t.base["layers"]["attention"]["q_proj"].addressable_shards[0].data.shape == (2, 16, 2, 8)
    assert losses[-1] < losses[0], losses
    print("OK lora", losses)
""")


def test_sharded_step_matches_single_device(tmp_path):
    env = _run_env(tmp_path / "jax_cache")
    res = subprocess.run([sys.executable, "-c", SHARDED], env=env, timeout=300, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("OK") == 2
