"""llama-jax checkpoint -> Hugging Face folder or Meta native checkpoint.

Parameters are read one at a time (one layer slice at a time for stacked weights) with
:func:`llama_jax.checkpoint.read_param` and mapped back with :func:`conversions.layout.ours_to_torch`.

- Hugging Face: ``config.json`` (:meth:`LlamaConfig.to_hf_config`, loadable by ``transformers`` as it is),
  ``model-NNNNN-of-MMMMM.safetensors`` shards of at most ``max_shard_bytes`` (default 5 GB) with
  ``model.safetensors.index.json`` (or a single ``model.safetensors``), written with ``safetensors.numpy`` (no
  torch needed), and a complete tokenizer (:func:`write_hf_tokenizer`): ``tokenizer.json``,
  ``tokenizer_config.json`` (chat template, BOS/EOS, ``add_bos_token``), ``special_tokens_map.json`` and
  ``generation_config.json`` (every stop id as ``eos_token_id``), so that ``transformers.AutoTokenizer`` +
  ``apply_chat_template`` gives the ids of :func:`llama_jax.chat.chat_format_for`, and ``--source=hf`` of the
  export gives back the same checkpoint and tokenizer. Memory: one shard's tensors are held while it is written.
- Meta: ``params.json`` (:meth:`LlamaConfig.to_meta_params`) and one ``consolidated.00.pth`` (q/k rows permuted
  back to Meta's interleaved order), plus ``tokenizer.model`` if stored. Memory: the whole model (``torch.save``
  writes one pickle).

Both write into a temporary sibling directory renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
from tqdm import tqdm

from conversions import layout
from conversions.hf import OURS_TO_HF, TOKENIZER_FILES
from conversions.meta import OURS_TO_META
from llama_jax import checkpoint

MAX_SHARD_BYTES = 5 * 10**9


def _contiguous(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w)


def _torch(w: np.ndarray):
    import ml_dtypes
    import torch

    if w.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(np.ascontiguousarray(w).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(w))


def _tensors(path, cfg, dtype, progress):
    """Yields (llama-jax name, layer or None, PyTorch-layout array with half-split q/k rows) in file order."""
    names = [n for n in layout.GLOBAL_PARAMS if not (n == "lm_head" and cfg.tie_word_embeddings)]
    total = len(names) + cfg.n_layers * len(layout.LAYER_PARAMS)
    with tqdm(total=total, unit="tensor", desc="export", disable=not progress) as bar:
        for name in names[:1]:
            yield name, None, _cast(layout.ours_to_torch(name, checkpoint.read_param(path, name), cfg), dtype)
            bar.update()
        for i in range(cfg.n_layers):
            for name in layout.LAYER_PARAMS:
                w = checkpoint.read_param(path, name, layer=i)
                yield name, i, _cast(layout.ours_to_torch(name, w, cfg), dtype)
                bar.update()
        for name in names[1:]:
            yield name, None, _cast(layout.ours_to_torch(name, checkpoint.read_param(path, name), cfg), dtype)
            bar.update()


def _cast(w, dtype):
    return w if dtype is None or w.dtype == dtype else w.astype(dtype)


def _start(output, overwrite):
    checkpoint._check_new_path(os.path.abspath(output), overwrite)
    return checkpoint._temp_sibling(output)


def _copy_tokenizer(src_dir, tmp, names=None):
    tok = checkpoint.tokenizer_dir(src_dir)
    if tok:
        for f in sorted(os.listdir(tok)):
            if names is None or f in names:
                shutil.copy2(os.path.join(tok, f), os.path.join(tmp, f))


def _stored_tokenizer(path):
    """The checkpoint's :class:`llama_jax.tokenizer.Tokenizer`, or None when it stores no vocabulary (no
    tokenizer/ directory, or one holding only side files such as generation_config.json).

    Raises ValueError naming the tokenizer directory when its files do not load."""
    from llama_jax.tokenizer import Tokenizer

    tok_dir = checkpoint.tokenizer_dir(path)
    if tok_dir is None or not any(
        f in ("tokenizer.json", "tokenizer.model") or f.endswith(".gguf") for f in os.listdir(tok_dir)
    ):
        return None
    try:
        return Tokenizer.from_file(tok_dir)
    except ValueError as e:
        raise ValueError(f"{tok_dir}: stored tokenizer does not load ({e})") from None


# Llama 3 chat format (llama_jax.chat.ChatFormat) as a Jinja template, for messages without tool calls: one
# <|begin_of_text|>, then per message a header (role "tool" written "ipython"), the content as given, <|eot_id|>.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- set role = 'ipython' if message['role'] == 'tool' else message['role'] %}"
    "{{- '<|start_header_id|>' + role + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable Latin-1 bytes map to themselves, the other 68 bytes to U+0100...
    (the spelling ``tokenizers``' ByteLevel pre-tokenizer uses; Radford et al. 2019, encoder.py)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _llama3_tokenizer_json(tok):
    """A ``tokenizers.Tokenizer`` equal to the Llama 3 tiktoken BPE ``tok`` (kind "llama3").

    tiktoken applies merges by rank; a byte-level BPE with, for every token, each split into two tokens of lower
    rank listed at the token's rank, merges the same pairs in the same order. Pre-tokenizer: the reference's split
    regex then byte-level spelling; the 256 special tokens keep their ids; plain encoding prepends
    <|begin_of_text|> as transformers' Llama 3 tokenizer does.
    """
    from tokenizers import (
        AddedToken,
        Regex,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )
    from tokenizers import Tokenizer as TK

    from llama_jax.tokenizer import LLAMA3_PAT_STR

    ranks = tok._backend.ranks
    spell = _byte_to_unicode()
    text = {b: "".join(spell[x] for x in b) for b in ranks}
    merges = []
    for b, r in ranks.items():
        pairs = [
            (ranks[b[:i]], ranks[b[i:]], b[:i], b[i:]) for i in range(1, len(b)) if b[:i] in ranks and b[i:] in ranks
        ]
        merges.extend((r, ra, rb, text[x], text[y]) for ra, rb, x, y in pairs)
    merges.sort()
    tk = TK(
        models.BPE(
            vocab={text[b]: r for b, r in ranks.items()},
            merges=[(m[3], m[4]) for m in merges],
            ignore_merges=True,
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PAT_STR), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    specials = sorted(tok.special_tokens.items(), key=lambda kv: kv[1])
    tk.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, _ in specials])
    bos = tok.decode([tok.bos_id])
    tk.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tok.bos_id)]
    )
    return tk


def write_hf_tokenizer(tok, directory: str, model_max_length: int | None = None) -> list[str]:
    """Writes ``tok`` as a Hugging Face tokenizer into ``directory``; returns the files written.

    Files: ``tokenizer.json`` (HF / GGUF vocabularies as stored; a Llama 3 tiktoken vocabulary rebuilt as an
    equal byte-level BPE, plus its ``tokenizer.model``; SentencePiece: ``tokenizer.model`` only),
    ``tokenizer_config.json`` (``chat_template``: the tokenizer's own, or for a Llama 3 vocabulary
    :data:`LLAMA3_CHAT_TEMPLATE`; ``bos_token``, ``eos_token``, ``add_bos_token``, ``model_max_length``),
    ``special_tokens_map.json`` and ``generation_config.json`` (``bos_token_id``, ``eos_token_id`` = every stop id).
    Reading them back with :meth:`llama_jax.tokenizer.Tokenizer.from_file` gives the same ids, BOS/EOS, stop ids and
    chat template.
    """
    written = []
    name = lambda i: None if i is None else tok.decode([i])  # noqa: E731
    template = tok.chat_template
    cfg = {
        "add_bos_token": tok.add_bos_token,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "bos_token": name(tok.bos_id),
        "eos_token": name(tok.eos_id),
    }
    if tok.kind == "hf":
        written += tok._backend.save(directory)
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    elif tok.kind == "llama3":
        path = os.path.join(directory, "tokenizer.json")
        _llama3_tokenizer_json(tok).save(path)
        written += [path] + tok._backend.save(directory)
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        template = template or LLAMA3_CHAT_TEMPLATE
    else:  # SentencePiece (Llama 2): transformers' LlamaTokenizer reads tokenizer.model
        written += tok._backend.save(directory)
        cfg["tokenizer_class"] = "LlamaTokenizer"
    if template:
        cfg["chat_template"] = template
    if model_max_length:
        cfg["model_max_length"] = int(model_max_length)
    stops = sorted(tok.stop_ids | ({tok.eos_id} if tok.eos_id is not None else set()))
    gen = {"bos_token_id": tok.bos_id, "eos_token_id": stops[0] if len(stops) == 1 else stops}
    special_map = {k: cfg[k] for k in ("bos_token", "eos_token") if cfg[k] is not None}
    for fname, obj in (
        ("tokenizer_config.json", cfg),
        ("special_tokens_map.json", special_map),
        ("generation_config.json", gen),
    ):
        path = os.path.join(directory, fname)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
        written.append(path)
    return written


def export_hf(
    input: str,
    output: str,
    dtype=None,
    overwrite: bool = False,
    progress: bool = True,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> str:
    """Writes a Hugging Face folder at ``output`` from llama-jax checkpoint ``input``; returns the path.

    Raises FileNotFoundError (input incomplete, named), FileExistsError (output exists, no overwrite).
    """
    from safetensors.numpy import save_file

    cfg = checkpoint.read_config(input)
    stored = np.dtype(checkpoint.stored_dtype(input))
    out_dtype = np.dtype(dtype) if dtype is not None else stored
    tokenizer = _stored_tokenizer(input)  # before any output exists: a bad tokenizer leaves nothing behind
    tmp = _start(output, overwrite)
    try:
        shards, current, size = [], {}, 0
        for name, layer, w in _tensors(input, cfg, dtype, progress):
            key = OURS_TO_HF[name].format(i=layer)
            if current and size + w.nbytes > max_shard_bytes:
                shards.append(current)
                save_file(current, os.path.join(tmp, f".shard{len(shards)}"), metadata={"format": "pt"})
                current, size = {}, 0
            current[key] = _contiguous(w)
            size += w.nbytes
        shards.append(current)
        n = len(shards)
        weight_map = {}
        if n == 1:
            save_file(current, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        else:
            save_file(current, os.path.join(tmp, f".shard{n}"), metadata={"format": "pt"})
            for j, shard in enumerate(shards, 1):
                fname = f"model-{j:05d}-of-{n:05d}.safetensors"
                os.rename(os.path.join(tmp, f".shard{j}"), os.path.join(tmp, fname))
                weight_map.update({k: fname for k in shard})
            total = sum(t.nbytes for s in shards for t in s.values())
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        del shards, current
        torch_dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[out_dtype.name]
        hf_config = cfg.to_hf_config(torch_dtype=torch_dtype)
        if tokenizer is not None:
            write_hf_tokenizer(tokenizer, tmp, model_max_length=cfg.max_seq_len)
            for k in ("bos_id", "eos_id"):
                if getattr(tokenizer, k) is not None:
                    hf_config[k.replace("_id", "_token_id")] = getattr(tokenizer, k)
        else:  # no vocabulary: side files (generation_config.json) as stored
            _copy_tokenizer(input, tmp, names=set(TOKENIZER_FILES))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        checkpoint._finish(tmp, output, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return os.path.abspath(output)


def export_meta(input: str, output: str, dtype=None, overwrite: bool = False, progress: bool = True) -> str:
    """Writes Meta's params.json + consolidated.00.pth at ``output`` from llama-jax checkpoint ``input``.

    Raises ValueError for configs Meta's format cannot express (tied embeddings, ...; field named),
    FileNotFoundError / FileExistsError as :func:`export_hf`.
    """
    import torch

    cfg = checkpoint.read_config(input)
    params = cfg.to_meta_params()  # raises ValueError naming the field first: nothing written yet
    tmp = _start(output, overwrite)
    try:
        sd = {}
        for name, layer, w in _tensors(input, cfg, dtype, progress):
            if name == "layers.attention.q_proj":
                w = layout.half_split_to_interleaved(w, cfg.n_heads)
            elif name == "layers.attention.k_proj":
                w = layout.half_split_to_interleaved(w, cfg.n_kv_heads)
            sd[OURS_TO_META[name].format(i=layer)] = _torch(np.ascontiguousarray(w))
        torch.save(sd, os.path.join(tmp, "consolidated.00.pth"))
        del sd
        with open(os.path.join(tmp, "params.json"), "w") as f:
            json.dump(params, f, indent=2)
        _copy_tokenizer(input, tmp, names={"tokenizer.model"})
        checkpoint._finish(tmp, output, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return os.path.abspath(output)
