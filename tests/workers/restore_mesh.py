"""Worker for tests/test_sharding.py: restoring an Orbax checkpoint onto a mesh of 8 fake CPU devices.

``python tests/workers/restore_mesh.py CKPT_DIR OUT.json``. Saves a model initialised sharded on (1, 8, 1), then
restores it with ``llama_jax.checkpoint.load(path, mesh=...)`` onto (1, 1, 8) and (2, 2, 2), and records for each:
every parameter's restored PartitionSpec vs ``state_shardings``, the fraction of its bytes on the fullest device,
the largest single device buffer among all live arrays (read before any value is fetched to the host), the
largest single-device buffer created during the restore (``BufferSpy``), and the largest difference from the
saved values.
"""

import gc
import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from llama_jax import checkpoint  # noqa: E402
from llama_jax import sharding as S  # noqa: E402
from llama_jax.config import LlamaConfig  # noqa: E402

CONFIG = LlamaConfig(
    vocab_size=512,
    dim=64,
    n_layers=2,
    n_heads=8,
    n_kv_heads=2,
    head_dim=8,
    hidden_dim=128,
    max_seq_len=64,
    rope_theta=10000.0,
)


class BufferSpy:
    """Records the bytes of every single-device buffer created through ``jax.device_put`` and every per-device
    array handed to ``jax.make_array_from_single_device_arrays`` while active (how Orbax builds sharded arrays)."""

    def __init__(self):
        self.sizes, self._orig = [], {}

    def __enter__(self):
        self._orig = {
            "device_put": jax.device_put,
            "make_array_from_single_device_arrays": jax.make_array_from_single_device_arrays,
        }
        spy = self

        def device_put(x, device=None, *args, **kwargs):
            out = spy._orig["device_put"](x, device, *args, **kwargs)
            for leaf in jax.tree.leaves(out):
                if isinstance(leaf, jax.Array):
                    spy.sizes.extend(s.data.nbytes for s in leaf.addressable_shards)
            return out

        def make_from_single(shape, sharding, arrays, *args, **kwargs):
            arrays = list(arrays)
            spy.sizes.extend(a.nbytes for a in arrays)
            return spy._orig["make_array_from_single_device_arrays"](shape, sharding, arrays, *args, **kwargs)

        jax.device_put = device_put
        jax.make_array_from_single_device_arrays = make_from_single
        return self

    def __exit__(self, *exc):
        for name, fn in self._orig.items():
            setattr(jax, name, fn)


def main(ckpt, out_path):
    model = S.init_sharded(CONFIG, S.make_mesh(fsdp=8), rngs_seed=3, param_dtype=jnp.float32)
    saved = {jax.tree_util.keystr(p): np.asarray(a) for p, a in jax.tree_util.tree_leaves_with_path(nnx.state(model))}
    checkpoint.save(ckpt, model)
    del model
    gc.collect()
    results = {}
    for dims in [(1, 1, 8), (2, 2, 2)]:
        mesh = S.make_mesh(*dims)
        with BufferSpy() as spy:
            restored = checkpoint.load(ckpt, dtype=jnp.float32, mesh=mesh)
        state = nnx.state(restored)
        want = S.state_shardings(state, mesh)
        params = {}
        for (path, arr), sh in zip(
            jax.tree_util.tree_leaves_with_path(state),
            jax.tree.leaves(want, is_leaf=lambda x: isinstance(x, nnx.Variable)),
            strict=False,
        ):
            per = max(s.data.nbytes for s in arr.addressable_shards)
            params[jax.tree_util.keystr(path)] = {
                "spec": str(arr.sharding.spec),
                "want": str(sh.get_value().spec),
                "nbytes": arr.nbytes,
                "fraction": per / arr.nbytes,
                "devices": len(arr.sharding.device_set),
            }
        # Largest buffer any device holds among all live arrays, before anything is fetched to the host.
        largest = max(s.data.nbytes for a in jax.live_arrays() for s in a.addressable_shards)
        diff = max(
            float(np.max(np.abs(np.asarray(a) - saved[jax.tree_util.keystr(p)])))
            for p, a in jax.tree_util.tree_leaves_with_path(state)
        )
        results["x".join(map(str, dims))] = {
            "params": params,
            "largest_live_buffer": largest,
            "diff": diff,
            "restore_buffers": len(spy.sizes),
            "largest_restore_buffer": max(spy.sizes, default=None),
        }
        del restored, state
        gc.collect()
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
