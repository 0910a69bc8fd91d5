"""Benchmark of the streaming Meta -> llama-jax conversion: peak resident memory and throughput vs depth.

Makes synthetic Meta checkpoints (params.json + consolidated.NN.pth model-parallel shards, random bf16 weights)
of the same width and two depths, converts each in a fresh process (``python -m conversions --source=meta``
semantics, via :func:`conversions.__main__.convert_from_flags`), and prints a table: checkpoint bytes, seconds,
GB/s, peak RSS (VmHWM of the converting process), and whether the deep conversion's peak stays
within the shallow one's plus two layers' bytes (what streaming promises: memory independent of depth).

    python experiments/bench_convert.py --dim=2048 --layers=4,32 --shards=2
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def meta_params(dim: int, n_layers: int, vocab: int) -> dict:
    n_heads = max(1, dim // 64)
    return dict(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=max(1, n_heads // 4),
        vocab_size=vocab,
        multiple_of=256,
        ffn_dim_multiplier=None,
        norm_eps=1e-5,
        rope_theta=500000.0,
        use_scaled_rope=True,
    )


def layer_bytes(params: dict, itemsize: int = 2) -> int:
    """Bytes of one decoder layer's weights (all shards together)."""
    from llama_jax.config import LlamaConfig

    c = LlamaConfig.from_meta_params(params)
    return itemsize * (c.dim * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads) + 3 * c.dim * c.hidden_dim + 2 * c.dim)


def make_meta_checkpoint(directory: str, params: dict, shards: int, dtype: str = "bfloat16", seed: int = 0) -> int:
    """Writes a Meta-layout model-parallel checkpoint with random weights; returns its size in bytes."""
    import torch

    from llama_jax.config import LlamaConfig

    c = LlamaConfig.from_meta_params(params)
    tdtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)
    block = torch.randn(1 << 20, generator=gen).to(tdtype)  # tiled: fast to make, not all-equal

    def rand(*shape):
        n = 1
        for s in shape:
            n *= s
        reps = -(-n // block.numel())
        offset = int(torch.randint(0, block.numel(), (1,), generator=gen))
        return block.roll(offset).repeat(reps)[:n].reshape(shape).clone() * 0.02

    d, h, s = c.dim, c.head_dim, shards
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "params.json"), "w") as f:
        json.dump(params, f)
    for r in range(s):
        sd = {
            "tok_embeddings.weight": rand(c.vocab_size // s, d),
            "norm.weight": torch.ones(d, dtype=tdtype),
            "output.weight": rand(c.vocab_size // s, d),
        }
        for i in range(c.n_layers):
            p = f"layers.{i}."
            sd[p + "attention.wq.weight"] = rand(c.n_heads * h // s, d)
            sd[p + "attention.wk.weight"] = rand(c.n_kv_heads * h // s, d)
            sd[p + "attention.wv.weight"] = rand(c.n_kv_heads * h // s, d)
            sd[p + "attention.wo.weight"] = rand(d, c.n_heads * h // s)
            sd[p + "feed_forward.w1.weight"] = rand(c.hidden_dim // s, d)
            sd[p + "feed_forward.w3.weight"] = rand(c.hidden_dim // s, d)
            sd[p + "feed_forward.w2.weight"] = rand(d, c.hidden_dim // s)
            sd[p + "attention_norm.weight"] = torch.ones(d, dtype=tdtype)
            sd[p + "ffn_norm.weight"] = torch.ones(d, dtype=tdtype)
        torch.save(sd, os.path.join(directory, f"consolidated.{r:02d}.pth"))
        del sd
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))


# VmHWM, not getrusage's ru_maxrss: on Linux ru_maxrss also counts the pre-exec image, i.e. the RSS of the
# (possibly large) parent process that forked this one.
_CHILD = """
import json, sys, time
from conversions.__main__ import convert_from_flags
t = time.perf_counter()
convert_from_flags("meta", sys.argv[1], sys.argv[2], progress=False, overwrite=True)
seconds = time.perf_counter() - t
hwm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(json.dumps({"seconds": seconds, "peak_rss": hwm}))
"""


def measure_conversion(input_dir: str, output_dir: str) -> dict:
    """Converts in a fresh Python process; returns {"seconds", "peak_rss" (bytes)}."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run(
        [sys.executable, "-c", _CHILD, input_dir, output_dir], capture_output=True, text=True, env=env, cwd=ROOT
    )
    if r.returncode != 0:
        raise RuntimeError(f"conversion of {input_dir} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_bench(dim: int, layers: list[int], shards: int, vocab: int, workdir: str, dtype: str = "bfloat16"):
    rows = []
    for n in layers:
        params = meta_params(dim, n, vocab)
        src, out = os.path.join(workdir, f"meta_{n}"), os.path.join(workdir, f"out_{n}")
        size = make_meta_checkpoint(src, params, shards, dtype)
        m = measure_conversion(src, out)
        rows.append(dict(layers=n, bytes=size, layer_bytes=layer_bytes(params, 2 if dtype != "float32" else 4), **m))
        shutil.rmtree(src)
        shutil.rmtree(out)
    return rows


def main(argv=None):
    from absl import app, flags

    flags.DEFINE_integer("dim", 2048, "Model width.")
    flags.DEFINE_list("layers", ["4", "32"], "Depths to compare (first is the baseline).")
    flags.DEFINE_integer("shards", 2, "Model-parallel shards of the synthetic Meta checkpoint.")
    flags.DEFINE_integer("vocab", 32768, "Vocabulary size.")
    flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Weight dtype.")
    flags.DEFINE_string("workdir", None, "Scratch directory (default: a temporary one).")
    F = flags.FLAGS

    def _main(_):
        work = F.workdir or tempfile.mkdtemp(prefix="bench_convert_")
        rows = run_bench(F.dim, [int(x) for x in F.layers], F.shards, F.vocab, work, F.dtype)
        print(f"dim {F.dim}, {F.shards} shards, {F.dtype}, vocab {F.vocab}")
        print(f"{'layers':>6} {'ckpt GB':>8} {'layer MB':>9} {'seconds':>8} {'GB/s':>6} {'peak RSS MB':>12}")
        for r in rows:
            print(
                f"{r['layers']:>6} {r['bytes'] / 1e9:>8.2f} {r['layer_bytes'] / 1e6:>9.1f} {r['seconds']:>8.1f} "
                f"{r['bytes'] / 1e9 / r['seconds']:>6.2f} {r['peak_rss'] / 1e6:>12.0f}"
            )
        base, deep = rows[0], rows[-1]
        limit = base["peak_rss"] + 2 * deep["layer_bytes"]
        print(
            f"peak({deep['layers']}) - peak({base['layers']}) = {(deep['peak_rss'] - base['peak_rss']) / 1e6:.0f} MB"
            f"; limit two layers = {2 * deep['layer_bytes'] / 1e6:.0f} MB -> "
            f"{'OK' if deep['peak_rss'] <= limit else 'EXCEEDED'}"
        )
        if not F.workdir:
            shutil.rmtree(work, ignore_errors=True)

    app.run(_main, argv)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    main()
