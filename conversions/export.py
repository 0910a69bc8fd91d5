"""llama-jax checkpoint -> Hugging Face folder or Meta native checkpoint.

Parameters are read one at a time (one layer slice at a time for stacked weights) with
:func:`llama_jax.checkpoint.read_param` and mapped back with :func:`conversions.layout.ours_to_torch`.

- Hugging Face: ``config.json`` (:meth:`LlamaConfig.to_hf_config`, loadable by ``transformers`` as it is),
  ``model-NNNNN-of-MMMMM.safetensors`` shards of at most ``max_shard_bytes`` (default 5 GB) with
  ``model.safetensors.index.json`` (or a single ``model.safetensors``), and the stored tokenizer files. Memory:
  one shard's tensors are held while it is written.
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
from conversions.hf import OURS_TO_HF
from conversions.meta import OURS_TO_META
from llama_jax import checkpoint

MAX_SHARD_BYTES = 5 * 10**9


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


def export_hf(input: str, output: str, dtype=None, overwrite: bool = False, progress: bool = True,
              max_shard_bytes: int = MAX_SHARD_BYTES) -> str:
    """Writes a Hugging Face folder at ``output`` from llama-jax checkpoint ``input``; returns the path.

    Raises FileNotFoundError (input incomplete, named), FileExistsError (output exists, no overwrite).
    """
    from safetensors.torch import save_file
    cfg = checkpoint.read_config(input)
    stored = np.dtype(checkpoint.stored_dtype(input))
    out_dtype = np.dtype(dtype) if dtype is not None else stored
    tmp = _start(output, overwrite)
    try:
        shards, current, size = [], {}, 0
        for name, layer, w in _tensors(input, cfg, dtype, progress):
            key = OURS_TO_HF[name].format(i=layer)
            if current and size + w.nbytes > max_shard_bytes:
                shards.append(current)
                save_file(current, os.path.join(tmp, f".shard{len(shards)}"), metadata={"format": "pt"})
                current, size = {}, 0
            current[key] = _torch(w)
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
            total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        del shards, current
        torch_dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[out_dtype.name]
        hf_config = cfg.to_hf_config(torch_dtype=torch_dtype)
        _copy_tokenizer(input, tmp, names=None)
        extras = os.path.join(tmp, "tokenizer_extras.json")
        if os.path.exists(extras):
            with open(extras) as f:
                ex = json.load(f)
            for k in ("bos_id", "eos_id"):
                if isinstance(ex.get(k), int):
                    hf_config[k.replace("_id", "_token_id")] = ex[k]
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
    params = cfg.to_meta_params()          # raises ValueError naming the field first: nothing written yet
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
