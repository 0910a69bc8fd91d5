"""The memory planner (python -m llama_jax.plan): 405B in minutes, parameter bytes vs arithmetic, bad input."""

import json
import os
import subprocess
import sys

import pytest

from llama_jax.config import get_preset
from tests.conftest import keep_kernel_flags
from tests.numerics import assert_logits_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_plan(tmp_path, *flags, timeout=300):
    out = tmp_path / "plan.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    keep_kernel_flags(env)  # the planner asks for its own fake CPU devices
    proc = subprocess.run(
        [sys.executable, "-m", "llama_jax.plan", *flags, f"--json_out={out}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc, (json.loads(out.read_text()) if out.exists() else None)


@pytest.mark.parametrize("quant,bytes_per_param", [("none", 2), ("int8", 1)])
def test_405b_plan_parameter_bytes_match_arithmetic(tmp_path, quant, bytes_per_param):
    proc, report = run_plan(
        tmp_path,
        "--model=llama3.1-405b",
        "--mesh=tensor=8",
        "--dtype=bfloat16",
        f"--quant={quant}",
        "--batch=1",
        "--max_length=131072",
        "--prefill_length=256",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    config = get_preset("llama3.1-405b")
    expected = config.num_params() * bytes_per_param / 8
    names = [p["name"].split()[0] for p in report["programs"]]
    assert names == ["prefill", "decode"]
    for p in report["programs"]:
        assert abs(p["params"] - expected) / expected < 0.01, (p, expected)
        # KV cache: k and v [L, B, S, K/8, H] in bf16 (8 KV heads over tensor=8), plus lengths.
        kv = 2 * config.n_layers * 1 * 131072 * (config.n_kv_heads // 8) * config.head_dim * 2
        assert kv <= p["cache"] <= kv + 64
        assert p["temp"] > 0
        assert p["total"] == p["params"] + p["cache"] + p["optimizer"] + p["temp"] + p["other_outputs"]
    assert "does NOT fit" in proc.stdout and "H200 (141 GB)" in proc.stdout
    # issue 8: 405B with a 128K context on 8 x H100 (80 GB, 90% usable) fits only with int8 weights
    peak = max(p["total"] for p in report["programs"])
    assert (peak <= 0.9 * 80e9) == (quant == "int8"), peak / 1e9


def test_train_step_plan_counts_adamw_state(tmp_path):
    proc, report = run_plan(
        tmp_path,
        "--model=llama3.1-8b",
        "--mesh=fsdp=8",
        "--max_length=2048",
        "--prefill_length=128",
        "--train",
        "--train_length=256",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    train = report["programs"][-1]
    assert train["name"].startswith("train step")
    assert abs(train["params"] - get_preset("llama3.1-8b").num_params() * 2 / 8) / train["params"] < 0.01
    # AdamW keeps two moments per parameter in the parameter dtype (plus a step count).
    assert abs(train["optimizer"] - 2 * train["params"]) / train["optimizer"] < 0.001
    assert train["temp"] > 0


@pytest.mark.parametrize(
    "flags,culprit",
    [
        (["--model=llama3.1-405b", "--mesh=tensor=3"], "'tensor'"),  # 3 divides neither heads nor vocab
        (["--model=llama3.1-8b", "--mesh=tensor=2,model=2"], "'model'"),
        (["--model=llama3.1-999b"], "llama3.1-999b"),
        (["--model=llama3.1-8b", "--mesh=tensor=1", "--max_length=0"], "--max_length"),
        (["--model=llama3.1-8b", "--mesh=tensor=1", "--quant=int8", "--train"], "--train"),
        (["--model=llama3.1-8b", "--quant=int4"], "quant"),
    ],
)
def test_bad_input_exits_nonzero_naming_the_culprit(tmp_path, flags, culprit):
    proc, report = run_plan(tmp_path, *flags, timeout=120)
    assert proc.returncode != 0
    assert culprit in proc.stderr, proc.stderr[-2000:]
    assert report is None and not list(tmp_path.iterdir())  # nothing written


def test_int8_weights_run_through_the_model():
    """The int8 layout the planner models is a working model: QArray params (int8 + per-output-channel scales)
    give the logits of the same model with the dequantized weights, and differ from float32 by rounding only."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from llama_jax import plan
    from llama_jax.config import LlamaConfig
    from llama_jax.model import Llama

    cfg = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=32)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.float32)))
    state = jax.jit(lambda: nnx.state(Llama(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.float32)))()
    qstate = jax.jit(plan.quantize_state)(state)
    qarrays = [
        v for v in jax.tree.leaves(qstate, is_leaf=lambda x: isinstance(x, plan.QArray)) if isinstance(v, plan.QArray)
    ]
    assert len(qarrays) == 9  # embedding, lm_head, q/k/v/o, gate/up/down
    q_proj = qstate["layers"]["attention"]["q_proj"].get_value()
    assert q_proj.q.dtype == jnp.int8 and q_proj.scale.shape == (2, 1, 4, 8)  # [L, 1 (embed), N, H]
    down = qstate["layers"]["mlp"]["down_proj"].get_value()
    assert down.scale.shape == (2, 1, 32)  # [L, 1 (mlp), D]
    tokens = jnp.arange(10, dtype=jnp.int32)[None] % cfg.vocab_size
    deq = jax.tree.map(
        lambda x: x[...] if isinstance(x, plan.QArray) else x, qstate, is_leaf=lambda x: isinstance(x, plan.QArray)
    )
    forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
    q_logits = forward(qstate, tokens)
    assert_logits_close(q_logits, forward(deq, tokens), cfg.dim, cfg.n_layers, "int8 vs dequantized")  # rounding
    f_logits = forward(state, tokens)
    err = float(jnp.max(jnp.abs(q_logits - f_logits)))
    assert 0 < err < 0.05 * float(jnp.max(jnp.abs(f_logits)))
