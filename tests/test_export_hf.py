"""The Hugging Face export is complete: written without torch, transformers' tokenizer and chat template give our
ids, and importing the export back (``--source=hf``) gives an identical llama-jax checkpoint, tokenizer and
template, which generates the same tokens."""

import json
import os
import stat
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import Engine, Tokenizer, chat_format_for, checkpoint
from llama_jax.chat import ChatFormat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DIALOGS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Capital of Italy?"},
        {"role": "assistant", "content": "Rome."},
        {"role": "user", "content": "And of Spain?\n"},
    ],
]

NO_TORCH_EXPORT = r"""
import sys
sys.modules["torch"] = None           # `import torch` raises ImportError, as in an environment without torch
from conversions.__main__ import convert_from_flags
print(convert_from_flags("orbax", sys.argv[1], sys.argv[2], target="hf", progress=False))
print(convert_from_flags("hf", sys.argv[2], sys.argv[3], progress=False))     # float32 import: no torch either
assert sys.modules["torch"] is None
"""


def _hf_ids(hf_tok, messages):
    out = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _same_tokenizer(a: Tokenizer, b: Tokenizer):
    for field in ("vocab_size", "bos_id", "eos_id", "stop_ids", "chat_template", "add_bos_token", "special_tokens"):
        assert getattr(a, field) == getattr(b, field), field
    text = "Hello world!  naïve café 東京 1234567 it's <|im_end|> <|eot_id|>\n\n\tend "
    assert a.encode(text) == b.encode(text) and a.decode(a.encode(text)) == b.decode(b.encode(text))


@pytest.fixture(scope="module")
def exported(smollm2_checkpoint, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("export") / "hf")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-c", NO_TORCH_EXPORT, smollm2_checkpoint, out, out + "_back"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_export_needs_no_torch_and_respects_umask(exported):
    names = set(os.listdir(exported))
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    } <= names
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(os.stat(exported).st_mode) == 0o777 & ~mask
    for f in names:
        assert stat.S_IMODE(os.stat(os.path.join(exported, f)).st_mode) == 0o666 & ~mask, f


def test_transformers_chat_template_gives_our_ids(exported, smollm2_checkpoint):
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(exported)
    ours = Tokenizer.from_file(checkpoint.tokenizer_dir(smollm2_checkpoint))
    fmt = chat_format_for(ours)
    assert hf_tok.eos_token == "<|im_end|>" and hf_tok.convert_tokens_to_ids(hf_tok.eos_token) == ours.eos_id
    for messages in DIALOGS:
        assert _hf_ids(hf_tok, messages) == fmt.encode_dialog_prompt(messages)


def test_hf_round_trip_is_identical_and_generates_the_same_tokens(exported, smollm2_checkpoint):
    back = exported + "_back"  # imported with --source=hf, torch blocked
    assert checkpoint.read_config(back) == checkpoint.read_config(smollm2_checkpoint)
    assert checkpoint.stored_dtype(back) == checkpoint.stored_dtype(smollm2_checkpoint)
    for name in checkpoint.param_shapes(checkpoint.read_config(back)):
        a, b = checkpoint.read_param(smollm2_checkpoint, name), checkpoint.read_param(back, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    tok_a = Tokenizer.from_file(checkpoint.tokenizer_dir(smollm2_checkpoint))
    tok_b = Tokenizer.from_file(checkpoint.tokenizer_dir(back))
    _same_tokenizer(tok_a, tok_b)
    prompts = [chat_format_for(tok_b).encode_dialog_prompt(m) for m in DIALOGS]
    assert prompts == [chat_format_for(tok_a).encode_dialog_prompt(m) for m in DIALOGS]

    runs = []
    for path, tok in ((smollm2_checkpoint, tok_a), (back, tok_b)):
        engine = Engine(checkpoint.load(path, dtype=jnp.float32))
        runs.append([c.tokens for c in engine.generate(prompts, max_new_tokens=8, temperature=0.0, tokenizer=tok)])
    assert runs[0] == runs[1] and all(len(t) > 0 for t in runs[0])


def test_llama3_tokenizer_export_matches_transformers(tmp_path):
    """A Llama 3 tiktoken vocabulary is exported as an equal tokenizer.json with a chat template of our format."""
    from transformers import AutoTokenizer

    from conversions.export import write_hf_tokenizer
    from llama_jax import assets

    tok = Tokenizer.from_file(assets.llama3_tokenizer_path())
    write_hf_tokenizer(tok, str(tmp_path), model_max_length=131072)
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in [
        "Hello world!  How are you?\n\n\tok",
        "naïve café 東京 1234567 ",
        "it's  'll  DON'T",
        "    indented\n  code()  \n",
    ]:  # (transformers turns special-token text typed in input into specials; we keep it plain)
        assert hf_tok(text, add_special_tokens=False).input_ids == tok.encode(text), text
    assert hf_tok("Hi").input_ids == tok.encode("Hi", bos=True)
    fmt = ChatFormat(tok)
    for messages in DIALOGS:
        assert _hf_ids(hf_tok, messages) == fmt.encode_dialog_prompt(messages)
    back = Tokenizer.from_file(str(tmp_path))  # what --source=hf stores
    assert (back.bos_id, back.eos_id, back.stop_ids) == (tok.bos_id, tok.eos_id, tok.stop_ids)
    assert chat_format_for(back).encode_dialog_prompt(DIALOGS[1]) == fmt.encode_dialog_prompt(DIALOGS[1])
    with open(tmp_path / "generation_config.json") as f:
        assert json.load(f)["eos_token_id"] == sorted(tok.stop_ids)
