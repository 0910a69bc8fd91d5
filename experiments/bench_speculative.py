"""Benchmark: speculative decoding on CPU, SmolLM2-135M-Instruct, plain greedy vs each proposer.

    python experiments/bench_speculative.py [--new_tokens=128] [--repeats=3] [--passage_tokens=1500] \
        [--proposers=plain,prompt_lookup,int8,layers] [--num_speculative=4] [--ngram=3] [--draft_layers=10]

Tasks (batch 1, greedy, chat format): (a) "summarise": a ~--passage_tokens passage built from the repository's
experiments/data/kjv_wisdom.jsonl (Proverbs, Ecclesiastes...) and the instruction to summarise it, prompt lookup's
home ground (the answer copies phrases of the input); (b) "chat": the three chat prompts of tests/test_generate.py.
Proposers: plain (no speculation), prompt_lookup (n-gram match), int8 (the same checkpoint with int8 weights as the
draft), layers (its first --draft_layers layers as the draft). Every speculative run is checked token for token
against plain greedy (the "same" column). Reported: decode tokens/s (new tokens after the first / wall time of the
generate call minus that of a 1-token run, i.e. without prefill; medians over --repeats after a warm-up run that
compiles), speedup over plain, acceptance rate (accepted / proposed tokens) and mean tokens per verify step. On a
shared machine compare ratios, not figures.
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
flags.DEFINE_list("tasks", ["summarise", "chat"], "Tasks to measure.")
flags.DEFINE_integer("num_speculative", 4, "k: tokens proposed per verify step.")
flags.DEFINE_integer("ngram", 3, "Prompt lookup n-gram size.")
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
    path = FLAGS.checkpoint or default_checkpoint(quiet=True)
    tokenizer = Tokenizer.from_file(checkpoint.tokenizer_dir(path))
    fmt = chat_format_for(tokenizer)
    text = passage(tokenizer, FLAGS.passage_tokens)
    tasks = {
        "summarise": ["Summarise the following passage, quoting its key sayings.\n\n" + text],
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
            return dict(speculative="prompt_lookup", num_speculative=FLAGS.num_speculative, ngram=FLAGS.ngram)
        return dict(speculative="draft", draft=drafts[name], num_speculative=FLAGS.num_speculative)

    rows = []
    for task in FLAGS.tasks:
        prompts = [fmt.encode_dialog_prompt([{"role": "user", "content": p}]) for p in tasks[task]]
        reference = None
        for name in FLAGS.proposers:
            tokens_per_s, same, stats = [], True, []
            kw = kwargs(name)
            for p in prompts:  # batch 1

                def timed(n, p=p, kw=kw):
                    engine.generate([p], max_new_tokens=n, **kw)  # warm-up (compiles)
                    times, out = [], None
                    for _ in range(FLAGS.repeats):
                        t = time.perf_counter()
                        out = engine.generate([p], max_new_tokens=n, **kw)
                        times.append(time.perf_counter() - t)
                    return statistics.median(times), out

                t_prefill, _ = timed(1)  # prefill (target and draft) + the first token
                t_full, out = timed(FLAGS.new_tokens)
                decode = t_full - t_prefill  # noise on a loaded machine can exceed a short decode: more --repeats
                tokens_per_s.append((len(out[0].tokens) - 1) / decode if decode > 0 else float("nan"))
                stats.append(out[0])
            if name == "plain":
                reference = [c.tokens for c in stats]
            elif reference is not None:
                same = all(c.tokens == r for c, r in zip(stats, reference, strict=True))
            rate = speculative.acceptance_rate(stats) if name != "plain" else None
            steps = sum(c.speculative["rounds"] for c in stats) if name != "plain" else None
            per_step = sum(len(c.tokens) - 1 for c in stats) / steps if steps else None
            rows.append(
                dict(
                    task=task,
                    proposer=name,
                    prompt_tokens=max(len(p) for p in prompts),
                    tokens_per_s=statistics.mean(tokens_per_s),
                    acceptance=rate,
                    tokens_per_step=per_step,
                    same=same if name != "plain" else None,
                )
            )
    base = {r["task"]: r["tokens_per_s"] for r in rows if r["proposer"] == "plain"}
    print(f"SmolLM2-135M-Instruct, CPU, batch 1, greedy, {FLAGS.new_tokens} new tokens, k={FLAGS.num_speculative}")
    head = f"{'task':10} {'proposer':14} {'prompt':>6} {'dec tok/s':>9} {'speedup':>8} {'accept':>7} {'tok/step':>8}"
    print(head + " same")
    for r in rows:
        speed = r["tokens_per_s"] / base[r["task"]] if r["task"] in base else float("nan")
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
