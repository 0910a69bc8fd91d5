"""Worker for tests/test_distributed.py: a sharded forward across two processes on 127.0.0.1.

python tests/workers/multihost.py ref OUT.npy CKPT
    one process, one device: unsharded Llama(seed 0) logits of the fixed batch; saves the model to CKPT.
python tests/workers/multihost.py worker OUT.npy CKPT --coordinator_address=127.0.0.1:PORT --num_processes=2
    --process_id=I
    each process has 4 fake CPU devices; the (data, fsdp, tensor) = (1, 2, 4) mesh spans both processes
    (fsdp across processes). Each process feeds only its own batch rows. Two models: initialised sharded from
    birth, and restored from CKPT onto the mesh by ``llama_jax.checkpoint.load`` (each process reads its
    shards), and that model saved by both processes (``checkpoint.save``) and loaded again. Process 0 writes the
    gathered logits of the three, stacked [3, B, T, V], to OUT.npy.
"""

import os
import sys

MODE, OUT, CKPT = sys.argv[1], sys.argv[2], sys.argv[3]
if MODE == "worker":
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from flax import nnx  # noqa: E402

from llama_jax import checkpoint  # noqa: E402
from llama_jax import distributed as D  # noqa: E402
from llama_jax import sharding as S  # noqa: E402
from llama_jax.config import LlamaConfig  # noqa: E402
from llama_jax.model import Llama  # noqa: E402

CONFIG = LlamaConfig(
    vocab_size=256,
    dim=64,
    n_layers=2,
    n_heads=8,
    n_kv_heads=2,
    head_dim=8,
    hidden_dim=128,
    max_seq_len=64,
    rope_theta=10000.0,
)
B, T = 4, 8
TOKENS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (B, T)).astype(np.int32)


def main():
    if MODE == "ref":
        model = Llama(CONFIG, rngs=nnx.Rngs(0), param_dtype=jnp.float32)
        np.save(OUT, np.asarray(model(jnp.asarray(TOKENS))))
        checkpoint.save(CKPT, model)
        return
    flags.FLAGS(sys.argv[3:])
    assert D.initialize_from_flags()
    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    mesh = S.make_mesh(data=1, fsdp=2, tensor=4)
    rows = D.process_rows(mesh, (B, T))
    assert rows.stop - rows.start == B // 2, rows  # each process loads only its half of the batch
    tokens = D.global_batch(TOKENS[rows], mesh, (B, T))
    outs = []
    restored = checkpoint.load(CKPT, dtype=jnp.float32, mesh=mesh)
    checkpoint.save(CKPT + "_multi", restored)  # every process writes its own shards
    resaved = checkpoint.load(CKPT + "_multi", dtype=jnp.float32, mesh=mesh)
    for model in (S.init_sharded(CONFIG, mesh, rngs_seed=0, param_dtype=jnp.float32), restored, resaved):
        graphdef, state = nnx.split(model)
        for arr in jax.tree.leaves(state):  # every parameter spans both processes' devices
            assert len(arr.sharding.device_set) == 8 and not arr.is_fully_addressable
        forward = S.jit_model_call(graphdef, S.state_shardings(state, mesh), mesh, B, CONFIG.vocab_size)
        outs.append(D.to_host(forward(state, tokens)))
    D.sync("logits gathered")
    if D.is_primary():
        np.save(OUT, np.stack(outs))


if __name__ == "__main__":
    main()
