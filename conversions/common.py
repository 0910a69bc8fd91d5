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
from collections.abc import Iterator

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
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def check_no_overlap(input: str, output: str) -> None:
    """Refuses an ``output`` that is, contains or lies inside ``input`` (writing it would destroy the source).

    Raises ConversionError naming both flags.
    """
    src, dst = os.path.realpath(input), os.path.realpath(output)
    if src == dst:
        raise ConversionError(f"--output: {output} is the --input itself; choose another output")
    if dst.startswith(src.rstrip(os.sep) + os.sep):
        raise ConversionError(f"--output: {output} lies inside --input {input}; choose an output outside it")
    if src.startswith(dst.rstrip(os.sep) + os.sep):
        raise ConversionError(f"--output: {output} contains --input {input}; replacing it would delete the source")


def _debris(output: str) -> list[str]:
    parent = os.path.dirname(os.path.abspath(output)) or "."
    prefix = f".{os.path.basename(os.path.abspath(output))}.partial-"
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    return [os.path.join(parent, n) for n in names if n.startswith(prefix)]


class _OutputLock:
    """An exclusive lock on ``.NAME.lock`` beside ``output`` for one conversion: while held, every
    ``.NAME.partial-*`` sibling is the debris of an earlier killed run (this tool's own temporary directory), which
    is removed. A second conversion to the same output at the same time is refused."""

    def __init__(self, output: str):
        self.path = os.path.join(
            os.path.dirname(os.path.abspath(output)) or ".", f".{os.path.basename(os.path.abspath(output))}.lock"
        )
        self.output = output
        self.fd = None

    def __enter__(self):
        import fcntl
        import shutil
        import sys

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            self.fd = None
            raise ConversionError(f"--output: {self.output}: another conversion is writing it now") from None
        for d in _debris(self.output):
            print(f"removing {d}: left by an interrupted conversion of {self.output}", file=sys.stderr)
            shutil.rmtree(d, ignore_errors=True)
        return self

    def __exit__(self, *exc):
        import fcntl

        try:
            os.remove(self.path)
        except OSError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        return False


def _finfo_max(dtype) -> float:
    import ml_dtypes

    return float(ml_dtypes.finfo(dtype).max)


def _count_non_finite(a: np.ndarray) -> int:
    flat = a.reshape(-1)
    step = 1 << 24  # bounded scratch memory: 16M booleans at a time
    return sum(
        int(flat[i : i + step].size - np.count_nonzero(np.isfinite(flat[i : i + step])))
        for i in range(0, flat.size, step)
    )


def checked_cast(name: str, value: np.ndarray, dtype, where: str, layer: int | None = None) -> np.ndarray:
    """``value`` cast to ``dtype``; ConversionError naming ``where``, the tensor and its layer when the source holds
    NaN/inf or the cast overflows (e.g. float16 beyond 65504)."""
    value = np.asarray(value)
    with np.errstate(over="ignore", invalid="ignore"):
        out = value if value.dtype == dtype else value.astype(dtype)
    bad = _count_non_finite(out)
    if not bad:
        return out
    what = f"tensor {name}" + (f" (layer {layer})" if layer is not None else "")
    if out is value or _count_non_finite(value):
        raise ConversionError(f"{where}: {what} holds NaN/inf value(s) in the source checkpoint")
    raise ConversionError(
        f"{where}: {what}: {bad} value(s) overflow --dtype={np.dtype(dtype).name} "
        f"(its largest finite value is {float(_finfo_max(dtype)):.6g}); choose --dtype=bfloat16 "
        "or float32"
    )


def convert(source: Source, output: str, dtype=None, overwrite: bool = False, progress: bool = True) -> str:
    """Streams ``source`` into a llama-jax checkpoint at ``output``; returns its path.

    ``dtype``: numpy dtype of the stored parameters (None: the source's own dtype). The tokenizer files are
    copied into ``output``/tokenizer. On any error nothing is left at ``output``; a rerun removes the temporary
    directory an earlier killed run of the same output left (``.NAME.partial-*``).

    Raises ConversionError naming the tensor when the source holds NaN/inf or the cast to ``dtype`` overflows.
    """
    import tempfile

    bound_malloc()
    cfg = source.config
    dtype = np.dtype(dtype or source.dtype)
    where = getattr(source, "path", None) or getattr(source, "dir", None) or "input"
    with (
        _OutputLock(output),
        checkpoint.CheckpointWriter(output, cfg, dtype=dtype, overwrite=overwrite) as writer,
        tqdm(total=source.total_bytes, unit="B", unit_scale=True, desc="convert", disable=not progress) as bar,
    ):
        for name, w in source.global_tensors():
            writer.write(name, checked_cast(name, layout.torch_to_ours(name, w, cfg), dtype, where))
            bar.update(source.bytes_read - bar.n)
            del w
        for i in range(cfg.n_layers):
            for name, w in source.layer_tensors(i):
                writer.write(name, checked_cast(name, layout.torch_to_ours(name, w, cfg), dtype, where, i), layer=i)
                bar.update(source.bytes_read - bar.n)
                del w
        with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(output)) or ".") as tmp:
            files = source.prepare_tokenizer(tmp)
            return writer.commit(tokenizer_files=files)


def check_shape(file: str, key: str, got, want) -> None:
    if tuple(got) != tuple(want):
        raise ConversionError(f"{file}: tensor {key} has shape {tuple(got)}, expected {tuple(want)}")
