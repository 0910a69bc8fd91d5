"""Benchmark: SmolLM2-135M-Instruct generation on CPU, llama-jax vs llama.cpp vs Hugging Face transformers.

    pip install -e .[bench]          # llama-cpp-python (compiles llama.cpp, ~5 min on 2 cores)
    python experiments/bench_generate.py [--new_tokens=64] [--repeats=3] [--engines=llama-jax,llama.cpp,transformers]
    python experiments/bench_generate.py --long_prompts     # + prefill 4096 / 8000 tokens, decode after 4000 (issue 15)

Each engine and precision is measured in its own process (``--worker``, internal), on the same token prompts, greedy,
so one engine's memory or threads never affect another, and peak RSS is per process. llama.cpp
(``llama-cpp-python``) reads F32 and Q8_0 GGUFs written from the shipped Q4_1 file with the ``gguf`` package
(dequantized with ``gguf.quants``, requantized / written with ``GGUFWriter``; cached next to the llama-jax
checkpoint). The table rows: prefill tokens/s (a --prompt_tokens prompt, float32), decode tokens/s at batch 1 with
float32, bfloat16 and int8 weights (llama.cpp: F32, -, Q8_0), decode at the larger --batch (float32), and peak RSS
(float32: load + prefill + batch-1 decode). Columns: llama-jax, llama.cpp, transformers, ratio (llama-jax /
llama.cpp at the same precision; bf16: / our float32), and the limit: batch-1 decode tokens/s if each token reads
every weight byte once at the read bandwidth measured in the same run (a jitted XLA sum over 1 GiB), and for RSS
the weight + KV cache bytes. Medians over --repeats; on a shared machine compare ratios, not absolute figures.

``--long_prompts`` adds the long-prompt rows (float32 / F32): prefill of each ``--long_prefill`` prompt (default 4096
and 8000 tokens; llama-jax into a cache of the next power of two above the prompt, llama.cpp with ``n_ctx`` 8192,
both in 512-token chunks / batches) and batch-1 decode after a ``--long_decode_after``-token prompt (default 4000;
llama-jax's cache then has 4096 slots). Ratios are against llama.cpp F32.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_integer("new_tokens", 64, "Decode steps timed per run.")
flags.DEFINE_integer("prompt_tokens", 512, "Prefill prompt length.")
flags.DEFINE_integer("repeats", 3, "Timed runs per figure (median reported).")
flags.DEFINE_multi_integer("batch", [1, 32], "Decode batch sizes (1 and one larger).")
flags.DEFINE_list("engines", ["llama-jax", "llama.cpp", "transformers"], "Engines to measure.")
flags.DEFINE_string("worker", None, "Internal: measure one engine:precision in this process and print JSON.")
flags.DEFINE_bool("long_prompts", False, "Also measure the long-prompt rows (--long_prefill, --long_decode_after).")
flags.DEFINE_list("long_prefill", ["4096", "8000"], "Long prefill prompt lengths (tokens), with --long_prompts.")
flags.DEFINE_integer("long_decode_after", 4000, "Prompt length of the long batch-1 decode row, with --long_prompts.")
flags.DEFINE_string("gguf_dir", None, "Where the F32 / Q8_0 GGUFs are written (default: the llama-jax cache).")

CACHE_LEN = 1024
SHORT = 16  # prompt length of the decode runs
LONG_CTX = 8192  # SmolLM2's context: the most a long row may use


def long_lengths() -> tuple[list[int], int]:
    """(--long_prefill lengths, --long_decode_after) when --long_prompts is on, else ([], 0)."""
    if not FLAGS.long_prompts:
        return [], 0
    return [int(n) for n in FLAGS.long_prefill], FLAGS.long_decode_after


def long_prompt(n: int) -> list[int]:
    """The first n tokens of the long prompt (the same tokens in every engine's process)."""
    import numpy as np

    return np.random.default_rng(1).integers(100, 40000, LONG_CTX).tolist()[:n]


def cache_slots(n: int) -> int:
    """Slots of llama-jax's cache for an n-token prompt followed by --new_tokens: the next power of two."""
    return 1 << (n + FLAGS.new_tokens).bit_length()


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM; ru_maxrss would carry the parent's peak across exec on Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_bandwidth(repeats):
    """Read bandwidth in bytes/s: a jitted sum over a 1 GiB float32 array."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((256, 1024, 1024), jnp.float32)
    f = jax.jit(lambda a: jnp.sum(a, axis=(1, 2)))
    f(x).block_until_ready()
    return x.nbytes / median_time(lambda: f(x).block_until_ready(), max(repeats, 5))


# ------------------------------------------------------------------------------------------------ GGUF files
def write_gguf(src: str, dst: str, qtype_name: str) -> str:
    """Writes ``dst``: every tensor of GGUF ``src`` dequantized (``gguf.quants``) and stored as F32, or for Q8_0
    re-quantized (2-D tensors whose rows are whole Q8_0 blocks; the rest F32); all metadata copied. Atomic; an
    existing ``dst`` is reused."""
    import gguf
    import numpy as np

    if os.path.isfile(dst):
        return dst
    qtype = gguf.GGMLQuantizationType[qtype_name]
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    tmp = f"{dst}.partial-{os.getpid()}"
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
                continue
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype_name == "F32" else gguf.LlamaFileType.MOSTLY_Q8_0)
        for t in reader.tensors:
            w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
            if qtype_name == "Q8_0" and w.ndim == 2 and w.shape[-1] % block == 0:
                writer.add_tensor(t.name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
            else:
                writer.add_tensor(t.name, w)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, dst)
    except BaseException:
        writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return dst


# ------------------------------------------------------------------------------------------------ workers
def worker_ours(precision, prompt, new_tokens, batches, repeats):
    import jax.numpy as jnp

    from llama_jax import checkpoint, quant
    from llama_jax.engine import Engine
    from llama_jax.generate import default_checkpoint

    ckpt = default_checkpoint(quiet=True)
    if precision == "int8":
        model = quant.load(ckpt, "int8")
    else:
        model = checkpoint.load(ckpt, dtype=jnp.dtype(precision))
    weight_bytes = quant.param_bytes(model)
    prefill_lengths, decode_after = long_lengths()
    engine = Engine(model, max_length=LONG_CTX if prefill_lengths or decode_after else 2048)
    out = {"weight_bytes": weight_bytes}

    def prefill():
        cache = engine.new_cache(1, CACHE_LEN)
        out["kv_bytes"] = cache.nbytes()
        _, logits = engine.prefill([prompt], cache)
        logits.block_until_ready()

    prefill()
    out["prefill"] = len(prompt) / median_time(prefill, repeats)
    if precision == "float32":
        for n in prefill_lengths:
            long, slots = long_prompt(n), min(cache_slots(n), LONG_CTX)

            def prefill_long(long=long, slots=slots):
                _, logits = engine.prefill([long], engine.new_cache(1, slots))
                logits.block_until_ready()

            prefill_long()
            out[f"prefill_{n}"] = n / median_time(prefill_long, repeats)
        if decode_after:

            def decode_long():
                ds = engine.start([long_prompt(decode_after)], max_new_tokens=new_tokens, temperature=0.0)
                ds.tokens.block_until_ready()
                t = time.perf_counter()
                ds = engine.loop(ds)
                ds.tokens.block_until_ready()
                return time.perf_counter() - t

            decode_long()
            out["decode_long"] = (new_tokens - 1) / statistics.median(decode_long() for _ in range(repeats))
    for b in batches:
        prompts = [prompt[:SHORT]] * b

        def decode(prompts=prompts):
            ds = engine.start(prompts, max_new_tokens=new_tokens, temperature=0.0)
            ds.tokens.block_until_ready()
            t = time.perf_counter()
            ds = engine.loop(ds)
            ds.tokens.block_until_ready()
            return time.perf_counter() - t

        decode()
        out[f"decode_b{b}"] = b * (new_tokens - 1) / statistics.median(decode() for _ in range(repeats))
        if b == 1:
            out["rss"] = peak_rss_bytes()
    return out


def worker_llamacpp(precision, prompt, new_tokens, batches, repeats, gguf_path):
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=gguf_path,
        n_ctx=CACHE_LEN,
        n_batch=512,
        n_ubatch=512,
        n_threads=os.cpu_count(),
        n_threads_batch=os.cpu_count(),
        verbose=False,
    )
    out = {"weight_bytes": os.path.getsize(gguf_path)}

    def prefill():
        llm.reset()
        llm.eval(prompt)

    prefill()
    out["prefill"] = len(prompt) / median_time(prefill, repeats)
    if precision == "F32":
        prefill_lengths, decode_after = long_lengths()
        if prefill_lengths or decode_after:
            long_llm = llama_cpp.Llama(
                model_path=gguf_path,
                n_ctx=LONG_CTX,
                n_batch=512,
                n_ubatch=512,
                n_threads=os.cpu_count(),
                n_threads_batch=os.cpu_count(),
                verbose=False,
            )
            for n in prefill_lengths:
                long = long_prompt(n)

                def prefill_long(long=long):
                    long_llm.reset()
                    long_llm.eval(long)

                prefill_long()
                out[f"prefill_{n}"] = n / median_time(prefill_long, repeats)
            if decode_after:

                def decode_long():
                    gen = long_llm.generate(long_prompt(decode_after), top_k=1, temp=0.0, reset=True)
                    next(gen)  # prefill + first token
                    t = time.perf_counter()
                    for _ in range(new_tokens - 1):
                        next(gen)
                    return time.perf_counter() - t

                decode_long()
                out["decode_long"] = (new_tokens - 1) / statistics.median(decode_long() for _ in range(repeats))
            del long_llm

    def decode():
        gen = llm.generate(prompt[:SHORT], top_k=1, temp=0.0, reset=True)
        next(gen)  # prefill + first token
        t = time.perf_counter()
        for _ in range(new_tokens - 1):
            next(gen)
        return time.perf_counter() - t

    decode()
    out["decode_b1"] = (new_tokens - 1) / statistics.median(decode() for _ in range(repeats))
    out["rss"] = peak_rss_bytes()
    return out


def worker_hf(prompt, new_tokens, batches, repeats, gguf):
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32
    ).eval()
    out = {}
    ids = torch.tensor([prompt])
    with torch.no_grad():
        hf(ids)
        out["prefill"] = len(prompt) / median_time(lambda: hf(ids), repeats)
        prefill_lengths, decode_after = long_lengths()
        for n in prefill_lengths:
            long = torch.tensor([long_prompt(n)])
            hf(long)
            out[f"prefill_{n}"] = n / median_time(lambda long=long: hf(long), repeats)
        if decode_after:
            long = torch.tensor([long_prompt(decode_after)])
            kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
            hf.generate(long, max_new_tokens=2, min_new_tokens=2, **kw)
            one = median_time(lambda: hf.generate(long, max_new_tokens=1, min_new_tokens=1, **kw), repeats)
            full = median_time(
                lambda: hf.generate(long, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw), repeats
            )
            out["decode_long"] = (new_tokens - 1) / max(full - one, 1e-9)
        for b in batches:
            batch = torch.tensor([prompt[:SHORT]] * b)
            kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
            hf.generate(batch, max_new_tokens=2, min_new_tokens=2, **kw)
            one = median_time(
                lambda batch=batch, kw=kw: hf.generate(batch, max_new_tokens=1, min_new_tokens=1, **kw), repeats
            )
            full = median_time(
                lambda batch=batch, kw=kw: hf.generate(
                    batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw
                ),
                repeats,
            )
            out[f"decode_b{b}"] = b * (new_tokens - 1) / max(full - one, 1e-9)
            if b == 1:
                out["rss"] = peak_rss_bytes()
    return out


def run_worker(spec: str) -> dict:
    """Runs one measurement in a fresh process (this script with --worker=spec); returns its JSON result."""
    argv = [
        sys.executable,
        os.path.abspath(__file__),
        f"--worker={spec}",
        f"--new_tokens={FLAGS.new_tokens}",
        f"--prompt_tokens={FLAGS.prompt_tokens}",
        f"--repeats={FLAGS.repeats}",
    ]
    argv += [f"--batch={b}" for b in FLAGS.batch]
    if FLAGS.long_prompts:
        argv += ["--long_prompts", f"--long_prefill={','.join(FLAGS.long_prefill)}"]
        argv.append(f"--long_decode_after={FLAGS.long_decode_after}")
    if FLAGS.gguf_dir:
        argv.append(f"--gguf_dir={FLAGS.gguf_dir}")
    r = subprocess.run(argv, capture_output=True, text=True)
    lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
    if r.returncode != 0 or not lines:
        print(f"[{spec}] failed (exit {r.returncode}):\n{r.stderr[-2000:]}", file=sys.stderr)
        return {}
    return json.loads(lines[-1])


def gguf_paths() -> dict:
    from llama_jax import assets
    from llama_jax.generate import cache_root

    src = assets.smollm2_gguf_path()
    d = FLAGS.gguf_dir or os.path.join(cache_root(), "bench")
    os.makedirs(d, exist_ok=True)
    return {
        "src": src,
        "F32": os.path.join(d, "smollm2-135m-instruct-f32.gguf"),
        "Q8_0": os.path.join(d, "smollm2-135m-instruct-q8_0.gguf"),
    }


def main(argv):
    logging.set_verbosity(logging.WARNING)
    import numpy as np

    prompt = np.random.default_rng(0).integers(100, 40000, FLAGS.prompt_tokens).tolist()
    if FLAGS.worker:
        engine, _, precision = FLAGS.worker.partition(":")
        if engine == "bandwidth":
            out = {"bandwidth": measure_bandwidth(FLAGS.repeats)}
        elif engine == "llama-jax":
            out = worker_ours(precision, prompt, FLAGS.new_tokens, FLAGS.batch, FLAGS.repeats)
        elif engine == "llama.cpp":
            out = worker_llamacpp(
                precision, prompt, FLAGS.new_tokens, FLAGS.batch, FLAGS.repeats, gguf_paths()[precision]
            )
        elif engine == "transformers":
            out = worker_hf(prompt, FLAGS.new_tokens, FLAGS.batch, FLAGS.repeats, gguf_paths()["src"])
        else:
            raise app.UsageError(f"--worker: unknown engine {engine!r}")
        print(json.dumps(out))
        return

    try:
        prefill_lengths, decode_after = long_lengths()
        bad = [n for n in prefill_lengths if not 0 < n < LONG_CTX] + [n for n in [decode_after] if n < 0]
    except ValueError:
        raise app.UsageError(f"--long_prefill: integers expected, got {FLAGS.long_prefill}") from None
    if bad or decode_after + FLAGS.new_tokens > LONG_CTX:
        raise app.UsageError(
            f"--long_prefill / --long_decode_after: prompt lengths must be in 1..{LONG_CTX - 1} (SmolLM2's context "
            f"{LONG_CTX}) with room for --new_tokens, got {FLAGS.long_prefill} / {FLAGS.long_decode_after}"
        )
    unknown = set(FLAGS.engines) - {"llama-jax", "llama.cpp", "transformers"}
    if unknown:
        raise app.UsageError(f"--engines: unknown {sorted(unknown)} (llama-jax, llama.cpp, transformers)")
    big = max(FLAGS.batch)
    if "llama.cpp" in FLAGS.engines:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise app.UsageError("--engines=llama.cpp needs llama-cpp-python: pip install -e .[bench]") from None
        paths = gguf_paths()
        for q in ("F32", "Q8_0"):
            write_gguf(paths["src"], paths[q], q)
    bandwidth = run_worker("bandwidth")["bandwidth"]  # in its own process too: this one stays small
    ours = (
        {p: run_worker(f"llama-jax:{p}") for p in ("float32", "bfloat16", "int8")}
        if "llama-jax" in FLAGS.engines
        else {}
    )
    cpp = {p: run_worker(f"llama.cpp:{p}") for p in ("F32", "Q8_0")} if "llama.cpp" in FLAGS.engines else {}
    hf = run_worker("transformers:float32") if "transformers" in FLAGS.engines else {}

    def get(d, *keys):
        for k in keys:
            d = (d or {}).get(k)
        return d

    f32 = ours.get("float32", {})
    rows = [  # label, ours, llama.cpp, transformers, ratio baseline, limit
        (
            f"prefill tok/s ({FLAGS.prompt_tokens}-token prompt)",
            get(f32, "prefill"),
            get(cpp, "F32", "prefill"),
            hf.get("prefill"),
            get(cpp, "F32", "prefill"),
            None,
        )
    ]
    for p, c in (("bfloat16", None), ("int8", "Q8_0")):
        rows.append(
            (
                f"prefill tok/s, {p} ({FLAGS.prompt_tokens} tokens)",
                get(ours, p, "prefill"),
                get(cpp, c, "prefill") if c else None,
                None,
                get(cpp, c, "prefill") if c else get(f32, "prefill"),
                None,
            )
        )
    for n in prefill_lengths:
        rows.append(
            (
                f"prefill tok/s ({n}-token prompt)",
                get(f32, f"prefill_{n}"),
                get(cpp, "F32", f"prefill_{n}"),
                hf.get(f"prefill_{n}"),
                get(cpp, "F32", f"prefill_{n}"),
                None,
            )
        )
    if decode_after:
        rows.append(
            (
                f"decode tok/s, b1, f32, {decode_after}-tok prompt",
                get(f32, "decode_long"),
                get(cpp, "F32", "decode_long"),
                hf.get("decode_long"),
                get(cpp, "F32", "decode_long"),
                None,
            )
        )
    for p, c in (("float32", "F32"), ("bfloat16", None), ("int8", "Q8_0")):
        o = get(ours, p, "decode_b1")
        wb = get(ours, p, "weight_bytes")
        rows.append(
            (
                f"decode tok/s, batch 1, {p}",
                o,
                get(cpp, c, "decode_b1") if c else None,
                hf.get("decode_b1") if p == "float32" else None,
                get(cpp, c, "decode_b1") if c else get(f32, "decode_b1"),
                wb and bandwidth / wb,
            )
        )
    if big > 1:
        rows.append(
            (
                f"decode tok/s, batch {big}, float32",
                get(f32, f"decode_b{big}"),
                None,
                hf.get(f"decode_b{big}"),
                hf.get(f"decode_b{big}"),
                None,
            )
        )
        for p in ("bfloat16", "int8"):
            rows.append(
                (
                    f"decode tok/s, batch {big}, {p}",
                    get(ours, p, f"decode_b{big}"),
                    None,
                    None,
                    get(f32, f"decode_b{big}"),
                    None,
                )
            )
    mb = 1e6
    rss_limit = (get(f32, "weight_bytes") or 0) + (get(f32, "kv_bytes") or 0)
    rows.append(
        (
            "peak RSS MB, float32 (load + batch 1)",
            get(f32, "rss") and f32["rss"] / mb,
            get(cpp, "F32", "rss") and cpp["F32"]["rss"] / mb,
            hf.get("rss") and hf["rss"] / mb,
            get(cpp, "F32", "rss") and cpp["F32"]["rss"] / mb,
            rss_limit / mb or None,
        )
    )

    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    print(
        f"\nSmolLM2-135M-Instruct, CPU x{os.cpu_count()}; float32 weights "
        f"{(get(f32, 'weight_bytes') or 0) / mb:.0f} MB; read bandwidth {bandwidth / 1e9:.1f} GB/s; "
        f"{FLAGS.new_tokens} new tokens, median of {FLAGS.repeats}"
    )
    print(
        f"| {'figure':40} | {'llama-jax':>9} | {'llama.cpp':>9} | {'transformers':>12} | {'ratio':>6} | {'limit':>7} |"
    )
    print(f"|{'-' * 42}|{'-' * 11}|{'-' * 11}|{'-' * 14}|{'-' * 8}|{'-' * 9}|")
    for label, o, c, h, base, lim in rows:
        ratio = "-" if o is None or not base else f"{o / base:.2f}x"
        print(f"| {label:40} | {fmt(o):>9} | {fmt(c):>9} | {fmt(h):>12} | {ratio:>6} | {fmt(lim):>7} |")
    print(
        "\nratio: llama-jax / llama.cpp at the same precision (F32, Q8_0); bfloat16: / llama-jax float32; "
        f"batch {big}: float32 / transformers, bfloat16 and int8 / llama-jax float32; RSS: / llama.cpp F32 (lower "
        "is better). limit: decode tok/s at the read "
        "bandwidth (weight bytes per token), RSS: weight + KV cache bytes."
    )


if __name__ == "__main__":
    app.run(main)
