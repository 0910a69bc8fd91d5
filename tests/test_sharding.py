"""Sharding: parity of sharded forward / greedy decode with one device, parameter placement, bad input.

The 8-device checks run tests/workers/mesh_parity.py in a subprocess (fake CPU devices must be requested
before jax is imported).
"""

import json
import os
import subprocess
import sys

import jax
import pytest

from llama_jax import sharding as S
from llama_jax.config import LlamaConfig
from tests.numerics import relative_tolerance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS = os.path.join(ROOT, "tests", "workers")


def run_worker(script, *args, timeout=600, devices=8):
    env = dict(os.environ)
    # fake CPU devices, appended to the caller's XLA flags (kernel choices) rather than replacing them
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["LLAMA_JAX_COMPILATION_CACHE"] = ""  # hermetic: no persistent XLA cache
    proc = subprocess.run(
        [sys.executable, os.path.join(WORKERS, script), *map(str, args)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    out = tmp_path_factory.mktemp("parity") / "parity.json"
    run_worker("mesh_parity.py", out)
    return json.loads(out.read_text())


MESHES = ["1x1x8", "1x8x1", "2x2x2", "1x2x4"]


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_logits_and_greedy_tokens_match_one_device(parity, mesh):
    r = parity[mesh]
    # sharded matmuls reduce in another order: float32 rounding at the worker's D 64, L 2, relative to max |logit|
    assert r["logits_diff"] <= relative_tolerance(64, 2) * parity["ref_scale"], r["logits_diff"]
    assert r["tokens"] == parity["ref_tokens"]
    if "engine_tokens" in r:  # llama_jax.engine.Engine.generate on the sharded parameters
        assert r["engine_tokens"] == parity["engine_ref_tokens"]
        assert any("tensor" in spec or "fsdp" in spec for spec in r["engine_specs"])
        assert r["engine_cache_specs"] == r["cache_specs"]  # the engine's KV cache is created in its shards
    if "init_diff" in r:  # sharded-from-birth init == unsharded init of the same seed
        assert r["init_diff"] <= 1e-6  # same RNG bits, one scaling of values ~0.02: rounding only


def test_parity_worker_covered_init_and_engine(parity):
    assert sum("init_diff" in parity[m] for m in MESHES) == 2
    assert sum("engine_tokens" in parity[m] for m in MESHES) == 2


@pytest.mark.parametrize("mesh", ["1x1x8", "1x8x1"])
def test_every_large_parameter_is_sharded(parity, mesh):
    tensor = int(mesh.split("x")[2])
    for path, p in parity[mesh]["params"].items():
        is_norm = "norm" in path
        kv_replicated = ("k_proj" in path or "v_proj" in path) and tensor > 2  # 2 KV heads < tensor axis
        if is_norm or kv_replicated:
            continue
        assert p["fraction"] <= 0.5, (mesh, path, p)
    if tensor == 8:  # K/V projections replicated over heads (not refused), and nothing else is
        for path, p in parity[mesh]["params"].items():
            if "k_proj" in path or "v_proj" in path:
                assert "tensor" not in p["spec"], (path, p)


def test_kv_cache_sharding(parity):
    # (1,2,4): batch 4 over fsdp=2; 2 KV heads not divisible... by 4 -> replicated; (2,2,2): heads on tensor.
    assert parity["1x2x4"]["cache_specs"][0] == "P(None, 'fsdp', None, None, None)"
    assert parity["2x2x2"]["cache_specs"][0] == "P(None, ('data', 'fsdp'), None, 'tensor', None)"


# ------------------------------------------------------------------------------------------ bad input
CFG = LlamaConfig(
    vocab_size=256, dim=64, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=8, hidden_dim=128, max_seq_len=64
)


def test_mesh_size_must_match_device_count():
    n = jax.device_count()
    with pytest.raises(ValueError, match=rf"tensor={n + 1} .*{n} device\(s\) are available"):
        S.make_mesh(tensor=n + 1)
    with pytest.raises(ValueError, match="'fsdp'"):
        S.make_mesh(fsdp=0)


def test_parse_mesh():
    assert S.parse_mesh_sizes("data=1,fsdp=2,tensor=4") == {"data": 1, "fsdp": 2, "tensor": 4}
    assert S.parse_mesh_sizes("tensor=8") == {"data": 1, "fsdp": 1, "tensor": 8}
    assert S.parse_mesh_sizes("") == {"data": 1, "fsdp": 1, "tensor": 1}
    for bad, culprit in [
        ("model=2", "'model'"),
        ("tensor=two", "'tensor'"),
        ("tensor=0", "'tensor'"),
        ("tensor=2,tensor=2", "'tensor'"),
        ("tensor", "'tensor'"),
    ]:
        with pytest.raises(ValueError, match=culprit):
            S.parse_mesh_sizes(bad)
        with pytest.raises(ValueError, match=culprit):
            S.parse_mesh(bad)
    n = jax.device_count()
    mesh = S.parse_mesh(f"tensor={n}")
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": n}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(ValueError, match=f"tensor={n + 1}"):
        S.parse_mesh(f"tensor={n + 1}")


class FakeMesh:
    """Just enough of a Mesh for validate(): axis sizes without devices."""

    def __init__(self, data=1, fsdp=1, tensor=1):
        self.shape = {"data": data, "fsdp": fsdp, "tensor": tensor}
        self.axis_names = tuple(self.shape)


@pytest.mark.parametrize(
    "field,value,axis", [("n_heads", 12, "q_heads"), ("hidden_dim", 100, "mlp"), ("vocab_size", 250, "vocab")]
)
def test_tensor_axis_must_divide(field, value, axis):
    cfg = CFG.replace(**{field: value, "n_kv_heads": 2 if field != "n_heads" else 4})
    with pytest.raises(
        ValueError,
        match=rf"mesh axis 'tensor' of size 8 does not divide {field}={value}"
        rf" \(logical axis '{axis}'\)",
    ):
        S.validate(cfg, FakeMesh(tensor=8))


def test_fsdp_axis_must_divide_dim():
    with pytest.raises(ValueError, match="'fsdp'.*dim=64"):
        S.validate(CFG, FakeMesh(fsdp=3))


def test_fewer_kv_heads_than_tensor_axis_is_replicated_not_refused():
    S.validate(CFG, FakeMesh(tensor=8))  # 2 KV heads, 8-way tensor axis: fine
    spec = S.logical_to_spec(("layers", "embed", "kv_heads", "head_dim"), (2, 64, 2, 8), FakeMesh(tensor=8))
    assert spec == jax.sharding.PartitionSpec(None, None, None, None)


def test_colliding_rules_are_refused():
    rules = dict(S.DEFAULT_RULES, embed="tensor")
    with pytest.raises(ValueError, match=r"'vocab' and 'embed' both map to mesh axis 'tensor'"):
        S.validate(CFG, FakeMesh(tensor=2), rules)
    rules = dict(S.DEFAULT_RULES, vocab="fsdp")  # vocab x embed both on fsdp
    with pytest.raises(ValueError, match="mesh axis 'fsdp'.*embedder.embedding"):
        S.validate_rules(rules)


def test_impossible_rules_are_refused():
    with pytest.raises(ValueError, match="'mlp'.*'model'"):
        S.validate_rules(dict(S.DEFAULT_RULES, mlp="model"))
    rules = dict(S.DEFAULT_RULES)
    del rules["head_dim"]
    with pytest.raises(ValueError, match="'head_dim'"):
        S.validate_rules(rules)
    with pytest.raises(ValueError, match="repeats"):
        S.validate_rules(dict(S.DEFAULT_RULES, batch=("data", "data")))


# ------------------------------------------------------------------------------------ restore onto a mesh
@pytest.fixture(scope="module")
def restored(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("restore")
    run_worker("restore_mesh.py", tmp / "ckpt", tmp / "restore.json")
    return json.loads((tmp / "restore.json").read_text())


@pytest.mark.parametrize("mesh", ["1x1x8", "2x2x2"])
def test_restore_onto_mesh_never_materialises_a_full_parameter(restored, mesh):
    r = restored[mesh]
    assert r["diff"] == 0.0  # exact round trip (float32)
    params = r["params"]
    for path, p in params.items():
        assert p["spec"] == p["want"], (path, p)  # restored straight into the rules' sharding
        assert p["devices"] == 8
    # Per-device budget = the largest per-device shard of any parameter (under half the largest parameter): no
    # buffer created during the restore, and no live buffer afterwards, exceeds it.
    largest_shard = max(p["nbytes"] * p["fraction"] for p in params.values())
    largest_param = max(p["nbytes"] for p in params.values())
    assert r["restore_buffers"] > 0
    assert r["largest_restore_buffer"] <= largest_shard < largest_param / 2
    assert r["largest_live_buffer"] <= largest_shard


def test_405b_on_a_16_way_tensor_axis_replicates_its_8_kv_heads():
    from llama_jax.config import get_preset

    cfg = get_preset("llama3.1-405b")
    mesh = FakeMesh(tensor=16)
    S.validate(cfg, mesh)  # not refused
    kv = S.logical_to_spec(("layers", "embed", "kv_heads", "head_dim"), (cfg.n_layers, cfg.dim, 8, 128), mesh)
    q = S.logical_to_spec(("layers", "embed", "q_heads", "head_dim"), (cfg.n_layers, cfg.dim, 128, 128), mesh)
    assert kv == jax.sharding.PartitionSpec(None, None, None, None)
    assert q == jax.sharding.PartitionSpec(None, None, "tensor", None)
