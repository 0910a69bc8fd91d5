"""The streaming conversion driver shared by every source (Meta, Hugging Face, GGUF).

A source reader (``conversions.meta.MetaSource``, ``conversions.hf.HFSource``, ``conversions.gguf.GGUFSource``)
validates every tensor's name and shape from file headers BEFORE any output is created, then yields tensors one
decoder layer at a time in PyTorch [out, in] layout with q/k rows in the half-split RoPE order.
:func:`convert` maps them with :func:`conversions.layout.torch_to_ours` and writes them through
:class:`llama_jax.checkpoint.CheckpointWriter` (temporary directory renamed into place on success), so about one
decoder layer plus the embeddings is resident at a time, with a tqdm progress bar in bytes read.
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np
from tqdm import tqdm

from conversions import layout
from llama_jax import checkpoint
from llama_jax.config import LlamaConfig

DTYPES = {"float32": np.float32, "bfloat16": "bfloat16", "float16": np.float16}


class ConversionError(ValueError):
    """A bad input checkpoint; the message names the file and the reason."""


class Source:
    """Interface of a source checkpoint reader.

    Attributes:
      config: the LlamaConfig (vocabulary and KV heads from tensor shapes).
      dtype: the natural numpy dtype of the weights (floating; quantized GGUF -> float32).
      tokenizer_files: files / directories to store under ``tokenizer/``.
      total_bytes: bytes of tensor data that will be read (for the progress bar).
      bytes_read: bytes of tensor data read so far (updated by the reader).
    """

    bytes_read: int = 0

    config: LlamaConfig
    dtype: np.dtype
    tokenizer_files: list
    total_bytes: int

    def global_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """(llama-jax name, PyTorch-layout array) for embedder.embedding, final_norm.scale, lm_head (untied)."""
        raise NotImplementedError

    def layer_tensors(self, i: int) -> Iterator[tuple[str, np.ndarray]]:
        """(llama-jax ``layers.*`` name, PyTorch-layout array of layer ``i``), q/k rows half-split."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def prepare_tokenizer(self, workdir: str) -> list:
        """Tokenizer files to copy (may write into ``workdir``)."""
        return list(self.tokenizer_files)


def numpy_dtype(name: str | None):
    """--dtype value -> numpy dtype (ml_dtypes bfloat16), or None."""
    if name is None:
        return None
    if name not in DTYPES:
        raise ConversionError(f"--dtype: {name!r} is not one of {', '.join(DTYPES)}")
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(DTYPES[name])


def torch_to_numpy(t) -> np.ndarray:
    """A CPU torch tensor -> numpy array (bfloat16 via ml_dtypes, bit-exact), copying out of any mmap."""
    import ml_dtypes
    import torch
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return t.contiguous().numpy().copy()


def bound_malloc() -> None:
    """glibc only (best effort): serve allocations >= 1 MiB with mmap and cap malloc arenas at 2, so buffers freed
    after each layer go back to the OS instead of lingering in per-thread heaps (glibc's dynamic mmap threshold
    otherwise grows to the largest freed block and resident memory creeps up layer after layer)."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)   # M_MMAP_THRESHOLD
        libc.mallopt(-8, 2)         # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def convert(source: Source, output: str, dtype=None, overwrite: bool = False, progress: bool = True) -> str:
    """Streams ``source`` into a llama-jax checkpoint at ``output``; returns its path.

    ``dtype``: numpy dtype of the stored parameters (None: the source's own dtype). The tokenizer files are
    copied into ``output``/tokenizer. On any error nothing is left at ``output``.
    """
    import tempfile
    bound_malloc()
    cfg = source.config
    dtype = np.dtype(dtype or source.dtype)
    with checkpoint.CheckpointWriter(output, cfg, dtype=dtype, overwrite=overwrite) as writer, \
            tqdm(total=source.total_bytes, unit="B", unit_scale=True, desc="convert", disable=not progress) as bar:
        for name, w in source.global_tensors():
            writer.write(name, layout.torch_to_ours(name, w, cfg))
            bar.update(source.bytes_read - bar.n)
            del w
        for i in range(cfg.n_layers):
            for name, w in source.layer_tensors(i):
                writer.write(name, layout.torch_to_ours(name, w, cfg), layer=i)
                bar.update(source.bytes_read - bar.n)
                del w
        with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(output)) or ".") as tmp:
            files = source.prepare_tokenizer(tmp)
            return writer.commit(tokenizer_files=files)


def check_shape(file: str, key: str, got, want) -> None:
    if tuple(got) != tuple(want):
        raise ConversionError(f"{file}: tensor {key} has shape {tuple(got)}, expected {tuple(want)}")
