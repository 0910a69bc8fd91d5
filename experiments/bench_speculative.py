"""Benchmark: speculative decoding on CPU, SmolLM2-135M-Instruct, plain greedy vs each proposer.

    python experiments/bench_speculative.py [--new_tokens=128] [--repeats=3] [--passage_tokens=1500] \
        [--proposers=plain,prompt_lookup,int8,layers] [--tasks=summarise,extract,chat] [--num_speculative=4] \
        [--lookup_speculative=6] [--ngram=8] [--draft_layers=10]

Tasks (batch 1, greedy, chat format), on a ~--passage_tokens passage built from the repository's
experiments/data/kjv_wisdom.jsonl (Proverbs, Ecclesiastes...): (a) "summarise": the instruction to summarise it,
quoting its key sayings (SmolLM2-135M answers this in its own words: an abstractive summary); (b) "extract": the
passage, then the instruction to list its key sayings quoted exactly (an extractive summary, prompt lookup's home
ground: the answer copies the input, and this small model goes on to repeat its own lines); (c) "chat": the three
chat prompts of tests/test_generate.py.
Proposers: plain (no speculation), prompt_lookup (n-gram match), int8 (the same checkpoint with int8 weights as the
draft), layers (its first --draft_layers layers as the draft). Every speculative run is checked token for token
against plain greedy (the "same" column). Reported: decode tokens/s (tokens after the first over the time from
the first token to the last: plain decoding's device loop after Engine.start, a speculative run's stream), the
median over prompts x --repeats after a warm-up run of each that compiles; speedup: the median of the per-run
ratios to plain, the proposers taking turns within a repeat so that a slower spell of a shared machine hits them
alike; acceptance rate (accepted / proposed tokens) and mean tokens per verify step.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "llama-jax checkpoint (default: SmolLM2-135M-Instruct, converted once).")
flags.DEFINE_integer("new_tokens", 128, "New tokens per prompt.")
flags.DEFINE_integer("passage_tokens", 1500, "Approximate length of the passage to summarise.")
flags.DEFINE_integer("repeats", 3, "Timed runs per figure (median reported).")
flags.DEFINE_list("proposers", ["plain", "prompt_lookup", "int8", "layers"], "What to measure.")
flags.DEFINE_list("tasks", ["summarise", "extract", "chat"], "Tasks to measure.")
flags.DEFINE_integer("num_speculative", 4, "k: tokens proposed per verify step by a draft model.")
flags.DEFINE_integer(
    "lookup_speculative", 6, "k of prompt lookup (a full n-gram match proposes k tokens, a shorter one fewer)."
)
flags.DEFINE_integer("ngram", 8, "Prompt lookup: longest n-gram matched.")
flags.DEFINE_integer("draft_layers", 10, "Layers of the first-layers self-draft.")
flags.DEFINE_bool("json", False, "Also print the rows as JSON lines.")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAT = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
]


def passage(tokenizer, n_tokens: int) -> str:
    """Whole records of experiments/data/kjv_wisdom.jsonl, line by line, until about ``n_tokens`` tokens."""
    lines = []
    with open(os.path.join(REPO, "experiments", "data", "kjv_wisdom.jsonl")) as f:
        for record in f:
            for line in json.loads(record)["text"].splitlines():
                lines.append(line)
                if len(tokenizer.encode("\n".join(lines))) >= n_tokens:
                    return "\n".join(lines)
    return "\n".join(lines)


def main(argv):
    del argv
    import jax

    from llama_jax import checkpoint, speculative
    from llama_jax.chat import chat_format_for
    from llama_jax.default_model import default_checkpoint
    from llama_jax.engine import Engine
    from llama_jax.logs import quiet_unless_verbose
    from llama_jax.tokenizer import Tokenizer

    quiet_unless_verbose()

    unknown = set(FLAGS.proposers) - {"plain", "prompt_lookup", "int8", "layers"}
    if unknown:
        print(f"--proposers: unknown {sorted(unknown)}", file=sys.stderr)
        return 2
    unknown = set(FLAGS.tasks) - {"summarise", "extract", "chat"}
    if unknown:
        print(f"--tasks: unknown {sorted(unknown)} (choose from summarise, extract, chat)", file=sys.stderr)
        return 2
    path = FLAGS.checkpoint or default_checkpoint(quiet=True)
    tokenizer = Tokenizer.from_file(checkpoint.tokenizer_dir(path))
    fmt = chat_format_for(tokenizer)
    text = passage(tokenizer, FLAGS.passage_tokens)
    tasks = {
        "summarise": ["Summarise the following passage, quoting its key sayings.\n\n" + text],
        "extract": [text + "\n\nList the key sayings of the passage above, quoted exactly."],
        "chat": CHAT,
    }
    engine = Engine(checkpoint.load(path), max_length=4096)
    drafts = {}
    if "int8" in FLAGS.proposers:
        drafts["int8"] = speculative.self_draft(path, quant="int8")
    if "layers" in FLAGS.proposers:
        drafts["layers"] = speculative.self_draft(path, layers=FLAGS.draft_layers)

    def kwargs(name):
        if name == "plain":
            return {}
        if name == "prompt_lookup":
            return dict(speculative="prompt_lookup", num_speculative=FLAGS.lookup_speculative, ngram=FLAGS.ngram)
        return dict(speculative="draft", draft=drafts[name], num_speculative=FLAGS.num_speculative)

    def decode(p, name):
        """(seconds, completion) of one batch-1 generation's decode: after the first token to the last. Plain:
        the device loop after Engine.start; speculative: the stream from its first token to its last."""
        if name == "plain":
            ds = engine.start([p], max_new_tokens=FLAGS.new_tokens)
            jax.block_until_ready(ds.tokens)
            t = time.perf_counter()
            ds = engine.loop(ds)
            jax.block_until_ready(ds.tokens)
            return time.perf_counter() - t, engine._completions(ds, [p], (), None)[0]
        stamps, last = [], None
        for item in engine.generate([p], max_new_tokens=FLAGS.new_tokens, stream=True, **kwargs(name)):
            stamps.append(time.perf_counter())
            last = item
        return stamps[-2] - stamps[0], last[0]  # the last item is the list of Completions

    rows = []
    for task in FLAGS.tasks:
        prompts = [fmt.encode_dialog_prompt([{"role": "user", "content": p}]) for p in tasks[task]]
        # per proposer: decode tok/s per (prompt, repeat); the proposers take turns within a repeat, so a slower
        # spell of a shared machine hits them alike and each repeat gives a ratio to plain of its own
        rates = {name: [] for name in FLAGS.proposers}
        outs = {}
        for i, p in enumerate(prompts):  # batch 1
            for name in FLAGS.proposers:
                decode(p, name)  # warm-up: compiles
            for _ in range(FLAGS.repeats):
                for name in FLAGS.proposers:
                    seconds, out = decode(p, name)
                    rates[name].append((len(out.tokens) - 1) / seconds)
                    outs[name, i] = out
        reference = [outs["plain", i].tokens for i in range(len(prompts))] if "plain" in FLAGS.proposers else None
        for name in FLAGS.proposers:
            stats = [outs[name, i] for i in range(len(prompts))]
            same = reference is None or all(c.tokens == r for c, r in zip(stats, reference, strict=True))
            rate = speculative.acceptance_rate(stats) if name != "plain" else None
            steps = sum(c.speculative["rounds"] for c in stats) if name != "plain" else None
            per_step = sum(len(c.tokens) - 1 for c in stats) / steps if steps else None
            speedup = None
            if reference is not None:
                speedup = statistics.median(a / b for a, b in zip(rates[name], rates["plain"], strict=True))
            rows.append(
                dict(
                    task=task,
                    proposer=name,
                    prompt_tokens=max(len(p) for p in prompts),
                    tokens_per_s=statistics.median(rates[name]),
                    speedup=speedup,
                    acceptance=rate,
                    tokens_per_step=per_step,
                    same=same if name != "plain" else None,
                )
            )
    print(
        f"SmolLM2-135M-Instruct, CPU, batch 1, greedy, {FLAGS.new_tokens} new tokens, k={FLAGS.num_speculative} "
        f"(drafts), k={FLAGS.lookup_speculative} (prompt lookup, n-gram {FLAGS.ngram})"
    )
    head = f"{'task':10} {'proposer':14} {'prompt':>6} {'dec tok/s':>9} {'speedup':>8} {'accept':>7} {'tok/step':>8}"
    print(head + " same")
    for r in rows:
        speed = float("nan") if r["speedup"] is None else r["speedup"]
        acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
        per = "-" if r["tokens_per_step"] is None else f"{r['tokens_per_step']:.2f}"
        same = "-" if r["same"] is None else ("yes" if r["same"] else "NO")
        print(
            f"{r['task']:10} {r['proposer']:14} {r['prompt_tokens']:>6} {r['tokens_per_s']:>9.1f} {speed:>7.2f}x "
            f"{acc:>7} {per:>8} {same}"
        )
        if FLAGS.json:
            print(json.dumps(r))
    return 0


if __name__ == "__main__":
    app.run(main)
