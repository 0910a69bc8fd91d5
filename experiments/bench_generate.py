"""Benchmark: SmolLM2-135M-Instruct float32 generation, llama-jax vs Hugging Face transformers, same run.

    python experiments/bench_generate.py [--new_tokens=64] [--repeats=3]

Prints a table: prefill tokens/s (512-token prompt), decode tokens/s at batch 1 and batch 32, for llama-jax and for
transformers' ``generate`` on the same GGUF (dequantized to float32 by each), and the batch-1 physical limit:
bytes of weights read per decoded token / measured memory bandwidth (a jitted XLA sum over a 1 GiB float32 array,
i.e. read bandwidth). Medians over --repeats; the machine is shared, so compare ratios, not absolute figures.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_integer("new_tokens", 64, "Decode steps timed per run.")
flags.DEFINE_integer("prompt_tokens", 512, "Prefill prompt length.")
flags.DEFINE_integer("repeats", 3, "Timed runs per figure (median reported).")
flags.DEFINE_multi_integer("batch", [1, 32], "Decode batch sizes.")
flags.DEFINE_bool("transformers", True, "Also measure Hugging Face transformers.")


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure_bandwidth(repeats):
    """Read bandwidth in bytes/s: a jitted sum over a 1 GiB float32 array."""
    import jax
    import jax.numpy as jnp
    x = jnp.ones((256, 1024, 1024), jnp.float32)
    f = jax.jit(lambda a: jnp.sum(a, axis=(1, 2)))
    f(x).block_until_ready()
    return x.nbytes / median_time(lambda: f(x).block_until_ready(), max(repeats, 5))


def bench_ours(ckpt, prompt, new_tokens, batches, repeats):
    import numpy as np
    from llama_jax import checkpoint
    from llama_jax.engine import Engine
    model = checkpoint.load(ckpt)
    engine = Engine(model, max_length=2048)
    results = {}
    cache_len = 1024

    def prefill():
        cache = engine.new_cache(1, cache_len)
        cache, logits = engine.prefill([prompt], cache)
        logits.block_until_ready()
    prefill()
    results["prefill"] = len(prompt) / median_time(prefill, repeats)
    short = prompt[:16]
    for b in batches:
        prompts = [short] * b
        def decode():
            ds = engine.start(prompts, max_new_tokens=new_tokens, temperature=0.0)
            ds.tokens.block_until_ready()
            t = time.perf_counter()
            ds = engine.loop(ds)
            ds.tokens.block_until_ready()
            return time.perf_counter() - t
        decode()
        secs = statistics.median(decode() for _ in range(repeats))
        results[f"decode_b{b}"] = b * (new_tokens - 1) / secs
    weight_bytes = sum(x.nbytes for x in __import__("jax").tree.leaves(__import__("flax").nnx.state(model)))
    return results, weight_bytes


def bench_hf(gguf, prompt, new_tokens, batches, repeats):
    import torch
    import transformers
    torch.set_num_threads(os.cpu_count())
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32).eval()
    results = {}
    ids = torch.tensor([prompt])
    with torch.no_grad():
        hf(ids)
        results["prefill"] = len(prompt) / median_time(lambda: hf(ids), repeats)
        for b in batches:
            batch = torch.tensor([prompt[:16]] * b)
            kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
            hf.generate(batch, max_new_tokens=2, min_new_tokens=2, **kw)
            one = median_time(lambda: hf.generate(batch, max_new_tokens=1, min_new_tokens=1, **kw), repeats)
            full = median_time(lambda: hf.generate(batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                   **kw), repeats)
            results[f"decode_b{b}"] = b * (new_tokens - 1) / max(full - one, 1e-9)
    return results


def main(argv):
    logging.set_verbosity(logging.WARNING)
    import numpy as np
    from llama_jax import assets
    from llama_jax.generate import default_checkpoint
    ckpt = default_checkpoint(quiet=True)
    gguf = assets.smollm2_gguf_path()
    prompt = np.random.default_rng(0).integers(100, 40000, FLAGS.prompt_tokens).tolist()

    bandwidth = measure_bandwidth(FLAGS.repeats)
    ours, weight_bytes = bench_ours(ckpt, prompt, FLAGS.new_tokens, FLAGS.batch, FLAGS.repeats)
    hf = bench_hf(gguf, prompt, FLAGS.new_tokens, FLAGS.batch, FLAGS.repeats) if FLAGS.transformers else {}
    limit = bandwidth / weight_bytes

    rows = [("prefill tok/s (512-token prompt)", "prefill")] + [
        (f"decode tok/s, batch {b}", f"decode_b{b}") for b in FLAGS.batch]
    print(f"\nSmolLM2-135M-Instruct float32, CPU x{os.cpu_count()}; weights {weight_bytes / 1e6:.0f} MB; "
          f"read bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"| {'figure':34} | {'llama-jax':>10} | {'transformers':>12} | {'ratio':>6} | {'limit':>8} |")
    print(f"|{'-' * 36}|{'-' * 12}|{'-' * 14}|{'-' * 8}|{'-' * 10}|")
    for label, key in rows:
        o, h = ours[key], hf.get(key)
        lim = f"{limit:8.1f}" if key == "decode_b1" else f"{'':8}"
        hf_col = "-" if h is None else f"{h:.1f}"
        ratio = "-" if h is None else f"{o / h:.2f}x"
        print(f"| {label:34} | {o:10.1f} | {hf_col:>12} | {ratio:>6} | {lim} |")
    b1 = ours.get("decode_b1")
    if b1:
        print(f"\nbatch-1 decode at {b1 / limit:.2f} of the bandwidth limit ({limit:.1f} tok/s = "
              f"{bandwidth / 1e9:.1f} GB/s / {weight_bytes / 1e6:.0f} MB per token)")
        if 32 in FLAGS.batch:
            print(f"batch-32 / batch-1 decode tokens/s: {ours['decode_b32'] / b1:.1f}x")


if __name__ == "__main__":
    app.run(main)
