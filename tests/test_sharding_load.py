"""One sharding rule for loading and for creating a model: ``load(ckpt, mesh=...)`` refuses a mesh that
``sharding.init_sharded`` refuses (a tensor axis that does not divide the query heads), naming the mesh axis, the
logical axis and the config field, as the README says. Runs on 8 fake CPU devices in a subprocess (the device
count must be set before jax is imported)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = r"""
import os, sys
import jax
import jax.numpy as jnp
from flax import nnx
import llama_jax
from llama_jax import quant, sharding
from llama_jax.config import LlamaConfig

assert jax.device_count() == 8, jax.device_count()
# SmolLM2-135M's head layout (9 query heads, 3 KV heads) at a tiny width
cfg = LlamaConfig(vocab_size=512, dim=72, n_layers=2, n_heads=9, n_kv_heads=3, head_dim=8, hidden_dim=96,
                  max_seq_len=64, rope_theta=10000.0)
path = llama_jax.save(sys.argv[1], llama_jax.Llama(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.float32))
mesh = sharding.make_mesh(data=2, tensor=4)
for name, fn in [("init_sharded", lambda: sharding.init_sharded(cfg, mesh)),
                 ("load", lambda: llama_jax.load(path, mesh=mesh)),
                 ("quant.load", lambda: quant.load(path, quant="int8", mesh=mesh))]:
    try:
        fn()
    except ValueError as e:
        print(f"{name}: ValueError: {e}")
    else:
        print(f"{name}: accepted")
ok = llama_jax.load(path, mesh=sharding.make_mesh(fsdp=8))        # a mesh that divides everything loads
print("fsdp=8:", tuple(ok.layers.attention.q_proj[...].sharding.spec))
"""


def test_load_refuses_the_mesh_init_sharded_refuses(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, str(tmp_path / "ckpt")],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    for name in ("init_sharded", "load", "quant.load"):
        msg = lines[name]
        assert msg.startswith("ValueError:"), (name, msg)
        assert "'tensor'" in msg and "n_heads=9" in msg and "'q_heads'" in msg, (name, msg)
    assert "'fsdp'" in lines["fsdp=8"]  # the model dimension split 8 ways
