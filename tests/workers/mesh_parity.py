"""Worker for tests/test_sharding.py: sharded forward / greedy decode vs one device, on 8 fake CPU devices.

Run as ``python tests/workers/mesh_parity.py OUT.json`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (set here too, before jax is imported).
For each mesh (data, fsdp, tensor) in (1,1,8), (1,8,1), (2,2,2), (1,2,4) it records:
  * the largest |logit difference| against the single-device model (prefill logits of every prompt position and
    each decode step's logits);
  * the greedy tokens of a prefill-then-decode loop (the model's KV-cache call, cache donated), and of
    ``llama_jax.engine.Engine.generate`` (ragged prompts, device loop) on the sharded parameters (ENGINE_MESHES);
  * on BIRTH_MESHES, the largest difference between ``init_sharded`` parameters and the unsharded init of the
    same seed, and for every parameter of ``init_sharded``, the fraction of its bytes held by the fullest device
    and its PartitionSpec (elsewhere the same for the reference parameters placed by ``state_shardings``).
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from llama_jax import sharding as S  # noqa: E402
from llama_jax.config import LlamaConfig  # noqa: E402
from llama_jax.engine import Engine  # noqa: E402
from llama_jax.kv_cache import init_cache  # noqa: E402
from llama_jax.model import Llama  # noqa: E402

MESHES = [(1, 1, 8), (1, 8, 1), (2, 2, 2), (1, 2, 4)]
BIRTH_MESHES = [(1, 1, 8), (1, 8, 1)]  # parameters made by init_sharded (else device_put of the reference)
ENGINE_MESHES = [(2, 2, 2), (1, 2, 4)]  # also greedy through llama_jax.engine.Engine
# GQA with 2 KV heads: fewer KV heads than an 8-way (or 4-way) tensor axis.
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
B, PROMPT, STEPS, MAX_LEN = 4, 6, 4, 16


def greedy(call, state, cache, prompt):
    """Prefill ``prompt`` [B, T] into ``cache``, then STEPS decode steps of argmax. Returns (tokens, logits)."""
    logits, cache = call(state, prompt, cache)  # [B, T, V]
    all_logits, tokens = [np.asarray(logits)], []
    for _ in range(STEPS):
        nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)[:, None]  # [B, 1]
        tokens.append(np.asarray(nxt)[:, 0])
        logits, cache = call(state, nxt, cache)
        all_logits.append(np.asarray(logits))
    return np.stack(tokens, 1), np.concatenate(all_logits, 1)


def main(out_path):
    assert jax.device_count() == 8, jax.devices()
    prompt = jax.random.randint(jax.random.key(1), (B, PROMPT), 0, CONFIG.vocab_size, jnp.int32)
    # The single-device reference, initialised under one jit on device 0 (eager init dispatches op by op).
    graphdef = nnx.graphdef(S.abstract_model(CONFIG, 0, jnp.float32))
    ref_state = jax.jit(lambda: nnx.state(Llama(CONFIG, rngs=nnx.Rngs(0), param_dtype=jnp.float32)))()

    def ref_call(state, tokens, cache):
        return nnx.merge(graphdef, state)(tokens, kv_cache=cache)

    ref_tokens, ref_logits = greedy(
        jax.jit(ref_call, donate_argnames="cache"), ref_state, init_cache(CONFIG, B, MAX_LEN, jnp.float32), prompt
    )

    prompts = [np.asarray(prompt)[i, : PROMPT - i].tolist() for i in range(B)]  # ragged prompts
    engine_ref = [
        c.tokens
        for c in Engine(nnx.merge(graphdef, ref_state), max_length=MAX_LEN, chunk_size=16).generate(
            prompts, max_new_tokens=STEPS
        )
    ]
    results = {
        "ref_tokens": ref_tokens.tolist(),
        "engine_ref_tokens": engine_ref,
        "ref_scale": float(np.max(np.abs(ref_logits))),
    }
    for dims in MESHES:
        mesh = S.make_mesh(*dims)
        sh = S.state_shardings(ref_state, mesh)
        state = jax.device_put(ref_state, sh)
        r = results["x".join(map(str, dims))] = {}
        if dims in BIRTH_MESHES:
            born = nnx.state(S.init_sharded(CONFIG, mesh, rngs_seed=0, param_dtype=jnp.float32))
            r["init_diff"] = max(
                float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                for a, b in zip(jax.tree.leaves(born), jax.tree.leaves(ref_state), strict=False)
            )
        else:
            born = state
        cache_sh = S.cache_shardings(CONFIG, mesh, B, MAX_LEN)
        call = S.jit_model_call(graphdef, sh, mesh, B, CONFIG.vocab_size, cache_sh=cache_sh)
        cache = S.init_cache_sharded(CONFIG, mesh, B, MAX_LEN, jnp.float32)
        cache_specs = [str(x.sharding.spec) for x in jax.tree.leaves(cache)]
        tokens, logits = greedy(call, state, cache, prompt)
        if dims in ENGINE_MESHES:
            engine = Engine(nnx.merge(graphdef, state), max_length=MAX_LEN, chunk_size=16, mesh=mesh)
            r["engine_tokens"] = [c.tokens for c in engine.generate(prompts, max_new_tokens=STEPS)]
            r["engine_specs"] = sorted({str(a.sharding.spec) for a in jax.tree.leaves(engine.params)})
            r["engine_cache_specs"] = [str(x.sharding.spec) for x in jax.tree.leaves(engine.new_cache(B, MAX_LEN))]
        params = {}
        for path, arr in jax.tree_util.tree_leaves_with_path(born):
            per = max(s.data.nbytes for s in arr.addressable_shards)
            params[jax.tree_util.keystr(path)] = {
                "fraction": per / arr.nbytes,
                "nbytes": arr.nbytes,
                "spec": str(arr.sharding.spec),
            }
        r.update(
            logits_diff=float(np.max(np.abs(logits - ref_logits))),
            tokens=tokens.tolist(),
            params=params,
            cache_specs=cache_specs,
        )
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
