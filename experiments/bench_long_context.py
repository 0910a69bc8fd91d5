"""Long-context benchmark: prefill up to 131072 tokens and decode after them on a small random Llama 3.1 model.

    python experiments/bench_long_context.py [--max_context=131072] [--decode_tokens=32] [--reference_max=16384]

A small random Llama 3.1 config (the real 3.1 ``rope_scaling``: factor 8, low/high frequency factors 1 and 4,
original context 8192; rope_theta 500000; max_seq_len 131072) prefills a prompt of ``context - decode_tokens``
random tokens through :class:`llama_jax.engine.Engine` (chunked prefill into a cache of ``context`` slots) and
greedily decodes ``decode_tokens`` after it (device loop). Each (context, attention) pair runs in its own process
so its peak RSS (``ru_maxrss``) is its own; compilation is excluded (a warm-up of the same shapes runs first).

Rows: context 1K, 2K, ... up to ``--max_context``, for the blockwise attention (``llama_jax.attention``, the
default) and, up to ``--reference_max``, the dense einsum oracle (``attention_impl="reference"``) whose scores
grow as chunk x context, and up to ``--transformers_max`` (default: every context) Hugging Face ``LlamaForCausalLM``
(same config, its own random weights, sdpa attention, one forward over the prompt keeping the last position's
logits, then cached greedy steps). The peak-RSS bound checked per row is weights + KV cache + 1 GB; the column
``x HF`` is prefill tokens/s over transformers' at the same context (issue 15 item 7 wants >= 1.0 at 16K and 128K).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import app, flags

flags.DEFINE_integer("max_context", 131072, "largest context (cache slots) to run; powers of two from 1024")
flags.DEFINE_integer("min_context", 1024, "smallest context")
flags.DEFINE_integer("decode_tokens", 32, "greedy tokens decoded after each prompt")
flags.DEFINE_integer("reference_max", 16384, "run the dense einsum path up to this context (0: never)")
flags.DEFINE_integer("chunk_size", 512, "prefill chunk")
flags.DEFINE_integer(
    "transformers_max",
    131072,
    "also time transformers (same config, random weights, sdpa) up to this context (0: never)",
)
flags.DEFINE_integer("dim", 128, "model dim")
flags.DEFINE_integer("n_layers", 2, "decoder layers")
flags.DEFINE_integer("n_heads", 4, "query heads")
flags.DEFINE_integer("n_kv_heads", 2, "KV heads")
flags.DEFINE_integer("vocab_size", 4096, "vocabulary")
flags.DEFINE_string("kv_dtype", None, "KV-cache dtype (e.g. int8); default the compute dtype")
flags.DEFINE_string("worker", None, "internal: run one row, 'context,impl', print JSON")
FLAGS = flags.FLAGS


def _config():
    from llama_jax.config import LlamaConfig, RopeScaling

    return LlamaConfig(
        vocab_size=FLAGS.vocab_size,
        dim=FLAGS.dim,
        n_layers=FLAGS.n_layers,
        n_heads=FLAGS.n_heads,
        n_kv_heads=FLAGS.n_kv_heads,
        hidden_dim=4 * FLAGS.dim,
        norm_eps=1e-5,
        rope_theta=500000.0,
        max_seq_len=131072,
        rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192),
    )


def _worker(context: int, impl: str) -> dict:
    import resource
    import time

    import jax
    import numpy as np
    from flax import nnx

    from llama_jax.engine import Engine
    from llama_jax.model import Llama

    config = _config()
    model = Llama(config, rngs=nnx.Rngs(0), attention_impl=None if impl == "blockwise" else impl)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    engine = Engine(model, max_length=context, chunk_size=FLAGS.chunk_size, kv_dtype=FLAGS.kv_dtype)
    n_new = FLAGS.decode_tokens
    prompt = np.random.default_rng(0).integers(0, config.vocab_size, context - n_new).tolist()

    # warm-up: the prefill chunk program for a cache of `context` slots and the first-token sampler (compilation
    # excluded from the timing)
    jax.block_until_ready(engine.prefill([prompt[: FLAGS.chunk_size]], engine.new_cache(1, context)))
    jax.block_until_ready(engine.start([prompt[: FLAGS.chunk_size]], max_new_tokens=n_new).tokens)
    t0 = time.perf_counter()
    ds = engine.start([prompt], max_new_tokens=n_new)  # chunked prefill + first token
    jax.block_until_ready(ds.tokens)
    prefill_s = time.perf_counter() - t0
    cache_bytes = ds.cache.nbytes()
    loop = engine._decode_loop.lower(engine.params, ds, mode=engine.mode(ds)).compile()  # ahead of time
    t0 = time.perf_counter()
    ds = loop(engine.params, ds)
    jax.block_until_ready(ds.tokens)
    decode_s = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(
        context=context,
        impl=impl,
        prompt=len(prompt),
        prefill_s=prefill_s,
        decode_s=decode_s,
        decoded=int(np.asarray(ds.num_generated)[0]) - 1,
        peak_rss=rss,
        weights=weight_bytes,
        kv_cache=cache_bytes,
    )


def _worker_transformers(context: int) -> dict:
    import resource
    import time

    import numpy as np
    import torch
    import transformers

    c = _config()
    hf_config = transformers.LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.dim,
        intermediate_size=c.hidden_dim,
        num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads,
        rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta,
        max_position_embeddings=c.max_seq_len,
        tie_word_embeddings=False,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_config).eval()
    n_new = FLAGS.decode_tokens
    ids = torch.tensor([np.random.default_rng(0).integers(0, c.vocab_size, context - n_new).tolist()])
    with torch.no_grad():
        model(ids[:, : FLAGS.chunk_size])  # warm-up
        t0 = time.perf_counter()
        out = model(ids, use_cache=True, logits_to_keep=1)  # the last position's logits, as our prefill
        prefill_s = time.perf_counter() - t0
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(n_new - 1):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        decode_s = time.perf_counter() - t0
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    kv = 2 * c.n_layers * context * c.n_kv_heads * c.head_dim * 4
    return dict(
        context=context,
        impl="transformers",
        prompt=ids.shape[1],
        prefill_s=prefill_s,
        decode_s=decode_s,
        decoded=n_new - 1,
        peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        weights=weights,
        kv_cache=kv,
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.worker:
        context, impl = FLAGS.worker.split(",")
        result = _worker_transformers(int(context)) if impl == "transformers" else _worker(int(context), impl)
        print("RESULT " + json.dumps(result))
        return 0
    if not 1024 <= FLAGS.min_context <= FLAGS.max_context <= 131072:
        print("error: need 1024 <= --min_context <= --max_context <= 131072", file=sys.stderr)
        return 2
    if FLAGS.decode_tokens < 1 or FLAGS.decode_tokens + FLAGS.chunk_size >= FLAGS.min_context:
        print(
            "error: --decode_tokens must be >= 1 and leave room for one prefill chunk in --min_context", file=sys.stderr
        )
        return 2
    contexts = []
    c = FLAGS.min_context
    while c <= FLAGS.max_context:
        contexts.append(c)
        c *= 2
    print(
        f"small random Llama 3.1 (dim {FLAGS.dim}, {FLAGS.n_layers} layers, {FLAGS.n_heads} heads / "
        f"{FLAGS.n_kv_heads} KV heads, vocab {FLAGS.vocab_size}, rope_scaling factor 8, max_seq_len 131072), "
        f"chunk {FLAGS.chunk_size}, {FLAGS.decode_tokens} decoded tokens, kv_dtype {FLAGS.kv_dtype or 'float32'}"
    )
    head = (
        f"{'context':>8} {'attention':>12} {'prefill s':>10} {'prefill tok/s':>14} {'decode tok/s':>13} "
        f"{'peak RSS GB':>12} {'bound GB':>9} {'ok':>3} {'x HF':>6}"
    )
    # decode tok/s: tokens after the first (which comes with the prefill) over the decode time
    print(head)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env.get("PYTHONPATH", "")]
    )
    passed_flags = [a for a in sys.argv[1:] if not a.startswith("--worker")]
    failed = False
    for context in contexts:
        impls = (
            (["transformers"] if context <= FLAGS.transformers_max else [])
            + ["blockwise"]
            + (["reference"] if context <= FLAGS.reference_max else [])
        )
        hf_rate = None
        for impl in impls:
            proc = subprocess.run(
                [sys.executable, os.path.abspath(__file__), *passed_flags, f"--worker={context},{impl}"],
                capture_output=True,
                text=True,
                env=env,
            )
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                print(f"{context:>8} {impl:>12} failed: {tail}")
                failed = True
                continue
            r = json.loads(lines[-1][len("RESULT ") :])
            bound = r["weights"] + r["kv_cache"] + 1e9
            ok = r["peak_rss"] <= bound
            failed |= impl == "blockwise" and not ok
            rate = r["prompt"] / r["prefill_s"]
            if impl == "transformers":
                hf_rate = rate
            ratio = f"{rate / hf_rate:.2f}" if hf_rate and impl != "transformers" else "-"
            print(
                f"{context:>8} {impl:>12} {r['prefill_s']:>10.2f} {rate:>14.0f} "
                f"{r['decoded'] / r['decode_s']:>13.1f} {r['peak_rss'] / 1e9:>12.2f} {bound / 1e9:>9.2f} "
                f"{'yes' if ok else 'NO':>3} {ratio:>6}",
                flush=True,
            )
    return 1 if failed else 0


if __name__ == "__main__":
    app.run(main)
