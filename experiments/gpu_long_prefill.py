"""Long-prompt prefill through one attention implementation: time and peak device memory (issue 15, item 8).

    python experiments/gpu_long_prefill.py --impl=cudnn --lengths=32768,131072          # on the GPU machine
    python experiments/gpu_long_prefill.py --impl=blockwise --chunk_size=4096 --lengths=32768,131072

A randomly initialised model of ``--preset`` (default Llama-3.1-8B's shape, bfloat16; random std-0.02 weights:
timing only) prefills a random prompt of ``length - 64`` tokens (bucketed to ``length``) through
:class:`llama_jax.engine.Engine` into a KV cache of ``max(lengths)`` slots, with ``attention_impl=--impl``. The timed
call follows a warm-up call whenever its chunk shape is new (compilation excluded). ``--chunk_size=0`` prefills
the whole prompt as one chunk, which is what the cuDNN path wants (a chunk starting at position 0 uses cuDNN's
causal mask; later chunks fall back to the blockwise path, see ``llama_jax.attention.cudnn_attention``). Peak device
memory is ``device.memory_stats()["peak_bytes_in_use"]`` (the process's peak so far: run one implementation per
process); on a backend without memory stats (CPU) the peak RSS is printed instead.

Prints one markdown row per length: impl, prompt tokens, chunk, seconds, tokens/s, peak GB.
"""

from __future__ import annotations

import dataclasses
import resource
import sys
import time

from absl import app, flags

flags.DEFINE_string("impl", "cudnn", "attention implementation (llama_jax.attention.IMPLEMENTATIONS)")
flags.DEFINE_string("lengths", "32768,131072", "comma-separated prompt buckets (powers of two)")
flags.DEFINE_integer("chunk_size", 0, "prefill chunk (a power of two); 0: the whole prompt in one chunk")
flags.DEFINE_string("preset", "llama3.1-8b", "model shape (llama_jax.config presets)")
flags.DEFINE_integer("n_layers", 0, "override the preset's layer count (0: keep; a smaller model for a smoke run)")
flags.DEFINE_string("dtype", "bfloat16", "parameter and compute dtype")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from llama_jax import attention
    from llama_jax.config import get_preset
    from llama_jax.engine import Engine
    from llama_jax.model import Llama

    if FLAGS.impl not in attention.IMPLEMENTATIONS:
        sys.exit(f"gpu_long_prefill: --impl must be one of {attention.IMPLEMENTATIONS}, got {FLAGS.impl!r}")
    try:
        lengths = [int(x) for x in FLAGS.lengths.split(",")]
        cfg = get_preset(FLAGS.preset)
    except ValueError as e:
        sys.exit(f"gpu_long_prefill: --lengths / --preset: {e}")
    if any(n < 128 or n & (n - 1) for n in lengths):
        sys.exit(f"gpu_long_prefill: --lengths must be powers of two >= 128, got {FLAGS.lengths!r}")
    if FLAGS.n_layers:
        cfg = dataclasses.replace(cfg, n_layers=FLAGS.n_layers)
    slots = max(lengths)
    chunk = FLAGS.chunk_size or slots
    dtype = jnp.dtype(FLAGS.dtype)
    t0 = time.perf_counter()
    model = Llama(cfg, rngs=nnx.Rngs(0), param_dtype=dtype, attention_impl=FLAGS.impl)
    engine = Engine(model, max_length=slots, chunk_size=chunk)
    device = jax.devices()[0]
    print(
        f"# {FLAGS.preset} ({cfg.n_layers} layers) {dtype.name} on {device.device_kind}; "
        f"init {time.perf_counter() - t0:.0f} s"
    )
    rng = np.random.default_rng(0)

    def peak_gb():
        stats = device.memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            return f"{stats['peak_bytes_in_use'] / 1e9:.1f} (device)"
        return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.1f} (RSS)"

    compiled = set()
    print("| impl | prompt tokens | chunk | prefill s | tok/s | peak GB |")
    print("|------|---------------|-------|-----------|-------|---------|")
    for n in lengths:
        prompt = rng.integers(0, cfg.vocab_size, n - 64).tolist()
        seconds, shape = None, min(chunk, n)
        for _ in range(1 if shape in compiled else 2):  # a first call of a new chunk shape compiles
            cache = engine.new_cache(1, slots)
            t = time.perf_counter()
            cache, logits = engine.prefill([prompt], cache)
            logits.block_until_ready()
            seconds = time.perf_counter() - t
            del cache
        compiled.add(shape)
        print(
            f"| {FLAGS.impl} | {len(prompt)} | {shape} | {seconds:.2f} | {len(prompt) / seconds:.0f} | {peak_gb()} |",
            flush=True,
        )


if __name__ == "__main__":
    app.run(main)
