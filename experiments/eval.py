"""Evaluation: sliding-window perplexity over a text file, and multiple-choice accuracy by log-likelihood.

    python experiments/eval.py --text=tests/data/eval_text.txt --window=256 --stride=128
    python experiments/eval.py --mc=tests/data/mc20.jsonl
    python experiments/eval.py --text=... --quant=int8            # int8 weights (llama_jax.quant)

Without ``--checkpoint`` SmolLM2-135M-Instruct is used (converted once, see ``llama_jax.generate``).

Perplexity (the strided scheme of Hugging Face's "Perplexity of fixed-length models" guide): the text is
tokenized once (with BOS); window i covers tokens [begin_i, end_i) with begin_i = i * stride and
end_i = min(begin_i + window, N); only its last ``end_i - end_{i-1}`` tokens are scored (the earlier ones are
context), so every token from position 1 on is scored exactly once. PPL = exp(total NLL / scored tokens).
Windows are scored in batches of ``--batch_size`` rows, right-padded to a bucketed length.

Multiple choice: JSONL lines ``{"question": str, "choices": [str, ...], "answer": int | str}`` (answer: the index,
a letter "A".., or the choice text). Each choice is scored as the sum of the log-probabilities of its tokens
``encode(" " + choice)`` after the context ``encode(question, bos=True)``; the prediction is the highest sum
(``--mc_normalize`` divides by the number of choice tokens). Malformed lines are reported with their line number
and refused (``--on_bad_line=error``, the default, exit 1, as in ``llama_jax.generate``) or skipped
(``--on_bad_line=skip``).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence

from absl import app, flags

from llama_jax.logs import exit_now, quiet_unless_verbose, stderr_held

FLAGS = flags.FLAGS

MIN_BUCKET = 16


def define_flags() -> None:
    """Defines the CLI's absl flags (only when run as a program, so that importing this module -- tests,
    notebooks -- does not clash with other modules' flags)."""
    flags.DEFINE_string("checkpoint", None, "llama-jax checkpoint directory; default SmolLM2-135M-Instruct.")
    flags.DEFINE_string("text", None, "UTF-8 text file to compute the perplexity of.")
    flags.DEFINE_integer("window", 256, "Tokens per perplexity window.")
    flags.DEFINE_integer("stride", 128, "Tokens between window starts (<= --window).")
    flags.DEFINE_string("mc", None, "JSONL file of multiple-choice questions.")
    flags.DEFINE_bool("mc_normalize", False, "Rank choices by mean instead of summed token log-likelihood.")
    flags.DEFINE_enum(
        "on_bad_line",
        "error",
        ["error", "skip"],
        "Malformed JSONL line: exit 1 naming file:line (default, as in llama_jax.generate), or report and skip.",
    )
    flags.DEFINE_integer("batch_size", 8, "Rows per forward pass.")
    flags.DEFINE_enum("quant", "none", ["none", "int8"], "Weight quantization at load (llama_jax.quant).")
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Parameter / compute dtype (default float32 on CPU).")
    flags.DEFINE_bool("json", False, "Print the results as one JSON object.")


class UsageError(ValueError):
    """Bad input; the message names the flag, file or line."""


class Scorer:
    """Per-token log-likelihoods from a :class:`llama_jax.Llama`, batched and jitted (one compilation per bucket).

    ``token_logprobs(rows)`` takes token id lists (each >= 2 tokens) and returns, per row, a float64 numpy array
    [len(row) - 1]: log p(row[t+1] | row[:t+1]) under the model (full float32 log-softmax).
    """

    def __init__(self, model, batch_size: int = 8):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        self.batch_size = batch_size
        self.graphdef, self.state = nnx.split(model)
        graphdef = self.graphdef

        def fn(state, tokens):
            m = nnx.merge(graphdef, state)
            logits = m(tokens)  # [B, T, V] float32
            logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
            return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]  # [B, T-1]

        self._fn = jax.jit(fn)

    def token_logprobs(self, rows: Sequence[Sequence[int]]):
        import jax.numpy as jnp
        import numpy as np

        out = []
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start : start + self.batch_size]
            longest = max(len(r) for r in batch)
            t = MIN_BUCKET
            while t < longest:
                t *= 2
            block = np.zeros((self.batch_size, t), np.int32)
            for i, r in enumerate(batch):
                block[i, : len(r)] = r
            lp = np.asarray(self._fn(self.state, jnp.asarray(block)), np.float64)
            out += [lp[i, : len(r) - 1] for i, r in enumerate(batch)]
        return out


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, n_scored) of each sliding window over ``n_tokens`` tokens: the last ``n_scored`` tokens of
    [begin, end) are scored. Raises ValueError for window < 2, stride < 1 or stride > window."""
    if window < 2:
        raise UsageError(f"--window must be >= 2, got {window}")
    if not 1 <= stride <= window:
        raise UsageError(f"--stride must be in [1, --window={window}], got {stride}")
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        scored = min(end - prev_end, end - begin - 1)  # a window's first token has no prediction in it
        if scored > 0:
            out.append((begin, end, scored))
        prev_end = end
        if end == n_tokens:
            break
    return out


def perplexity(scorer: Scorer, ids: Sequence[int], window: int, stride: int) -> dict:
    """Sliding-window perplexity of token ids (see the module docstring). Returns {"perplexity", "nll",
    "tokens", "windows"}."""
    wins = windows(len(ids), window, stride)
    if not wins:
        raise UsageError(f"--text: needs at least 2 tokens, got {len(ids)}")
    lps = scorer.token_logprobs([list(ids[b:e]) for b, e, _ in wins])
    nll = -sum(float(lp[-k:].sum()) for lp, (_, _, k) in zip(lps, wins, strict=False))
    count = sum(k for _, _, k in wins)
    return {"perplexity": math.exp(nll / count), "nll": nll, "tokens": count, "windows": len(wins)}


def read_jsonl(path: str, on_bad_line: str = "error", validate=None, flag: str = "--mc") -> list:
    """Objects of a JSONL file; a line that is not JSON or fails ``validate(obj)`` (raising ValueError) is
    reported on stderr as ``path:line: reason`` and skipped, or raises UsageError when ``on_bad_line="error"``.
    Blank lines are ignored."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UsageError(f"{flag}: {path}: {e.strerror}") from None
    out = []
    with f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                line = None
                problem = f"not valid UTF-8 (byte {e.start + 1} of the line)"
            if line is not None and not line.strip():
                continue
            try:
                if line is None:
                    raise ValueError(problem)
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"not valid JSON ({e.msg})") from None
                out.append(validate(obj) if validate else obj)
            except ValueError as e:
                msg = f"{flag}: {path}:{number}: {e}"
                if on_bad_line == "error":
                    raise UsageError(msg) from None
                print(f"warning: {msg}; line skipped", file=sys.stderr)
    return out


def validate_mc(obj) -> dict:
    """Checks one multiple-choice record and returns it with ``answer`` as an index. Raises ValueError."""
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object")
    q, choices, answer = obj.get("question"), obj.get("choices"), obj.get("answer")
    if not isinstance(q, str) or not q:
        raise ValueError('"question" must be a non-empty string')
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise ValueError('"choices" must be a list of >= 2 non-empty strings')
    if isinstance(answer, bool):
        answer = None
    if isinstance(answer, str):
        if answer in choices:
            answer = choices.index(answer)
        elif len(answer) == 1 and 0 <= ord(answer.upper()) - ord("A") < len(choices):
            answer = ord(answer.upper()) - ord("A")
    if not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise ValueError(
            f'"answer" must be an index in [0, {len(choices)}), a letter or a choice, got {obj.get("answer")!r}'
        )
    return {"question": q, "choices": choices, "answer": answer}


def choice_tokens(tokenizer, question: str, choice: str) -> tuple[list[int], list[int]]:
    """(context ids with BOS, continuation ids) of one choice."""
    ctx = tokenizer.encode(question, bos=tokenizer.bos_id is not None)
    return ctx, tokenizer.encode(" " + choice, bos=False)


def multiple_choice(scorer: Scorer, tokenizer, records: list[dict], normalize: bool = False) -> dict:
    """Scores every choice of every record; returns {"accuracy", "n", "results": [{"scores", "pred",
    "answer"}]}. Raises UsageError when there are no records."""
    if not records:
        raise UsageError("--mc: no valid questions")
    rows, spans = [], []
    for rec in records:
        for c in rec["choices"]:
            ctx, cont = choice_tokens(tokenizer, rec["question"], c)
            rows.append(ctx + cont)
            spans.append(len(cont))
    lps = scorer.token_logprobs(rows)
    results, k, correct = [], 0, 0
    for rec in records:
        scores = []
        for _ in rec["choices"]:
            s = float(lps[k][-spans[k] :].sum())
            scores.append(s / spans[k] if normalize else s)
            k += 1
        pred = max(range(len(scores)), key=scores.__getitem__)
        correct += pred == rec["answer"]
        results.append({"scores": scores, "pred": pred, "answer": rec["answer"]})
    return {"accuracy": correct / len(records), "n": len(records), "results": results}


def load_model(checkpoint_path: str | None, quant: str = "none", dtype=None):
    """(model, tokenizer) of a checkpoint (default SmolLM2), weights in ``quant`` form."""
    import jax.numpy as jnp

    from llama_jax import checkpoint
    from llama_jax import quant as quant_lib
    from llama_jax.default_model import default_checkpoint
    from llama_jax.tokenizer import Tokenizer

    path = checkpoint_path or default_checkpoint(quiet=True)
    if not os.path.isdir(path):
        raise UsageError(f"--checkpoint: {path}: no such directory")
    tok_dir = checkpoint.tokenizer_dir(path)
    if tok_dir is None:
        raise UsageError(f"--checkpoint: {path}: no tokenizer/ directory in the checkpoint")
    try:
        checkpoint.check_arrays(path)  # a missing chunk named before Orbax reads in threads
        with stderr_held():  # a damaged array: Orbax's failing reader threads stay off the terminal
            try:
                model = quant_lib.load(path, quant=quant, dtype=dtype and jnp.dtype(dtype))
            except (FileNotFoundError, ValueError):
                raise
            except Exception as e:  # noqa: BLE001 - Orbax wraps TensorStore read errors (a truncated chunk)
                while e.__cause__ is not None:
                    e = e.__cause__
                exit_now(f"error: --checkpoint: {path}: damaged parameter array ({str(e).splitlines()[0][:300]})", 1)
        tokenizer = Tokenizer.from_file(tok_dir)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--checkpoint: {e}") from None
    return model, tokenizer


def run() -> int:
    if not FLAGS.text and not FLAGS.mc:
        raise UsageError("--text or --mc is required")
    if FLAGS.batch_size < 1:
        raise UsageError(f"--batch_size must be >= 1, got {FLAGS.batch_size}")
    windows(10, FLAGS.window, FLAGS.stride)  # validates the flags before loading anything
    records = None
    if FLAGS.mc:
        records = read_jsonl(FLAGS.mc, FLAGS.on_bad_line, validate_mc)
        if not records:
            raise UsageError(f"--mc: {FLAGS.mc}: no valid questions")
    text = None
    if FLAGS.text:
        try:
            with open(FLAGS.text, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--text: {FLAGS.text}: {e}") from None
    model, tokenizer = load_model(FLAGS.checkpoint, FLAGS.quant, FLAGS.dtype)
    if FLAGS.window > model.config.max_seq_len:
        raise UsageError(f"--window={FLAGS.window} exceeds the model's context {model.config.max_seq_len}")
    scorer = Scorer(model, FLAGS.batch_size)
    out = {"quant": FLAGS.quant}
    if text is not None:
        ids = tokenizer.encode(text, bos=tokenizer.bos_id is not None)
        out["text"] = perplexity(scorer, ids, FLAGS.window, FLAGS.stride)
    if records is not None:
        mc = multiple_choice(scorer, tokenizer, records, FLAGS.mc_normalize)
        out["mc"] = {"accuracy": mc["accuracy"], "n": mc["n"], "preds": [r["pred"] for r in mc["results"]]}
    if FLAGS.json:
        print(json.dumps(out))
    else:
        if "text" in out:
            t = out["text"]
            print(
                f"perplexity {t['perplexity']:.4f} over {t['tokens']} tokens in {t['windows']} windows "
                f"(window {FLAGS.window}, stride {FLAGS.stride}, quant {FLAGS.quant})"
            )
        if "mc" in out:
            print(f"accuracy {out['mc']['accuracy']:.4f} on {out['mc']['n']} questions")
    return 0


def main(argv):
    quiet_unless_verbose()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        return run()
    except (UsageError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    define_flags()
    app.run(main)
