"""Explicit layout transforms between PyTorch-style [out, in] matrices and llama-jax einsum layouts.

The RoPE row permutation lives here and only here (cases/conversion.md): Meta and GGUF store each head's q/k
rows as interleaved pairs (2i, 2i+1); llama-jax (like Hugging Face) uses the half-split order (i, i + H/2):
new row j*(H/2) + i comes from old row 2i + j. q is permuted with n_heads, k with n_kv_heads.

All functions take and return numpy arrays (any dtype, no copies beyond what the reshape needs).
"""

from __future__ import annotations

import numpy as np


def interleaved_to_half_split(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a q/k projection [n_heads*H, D] from Meta's interleaved RoPE order to the half-split order."""
    rows, cols = w.shape
    h = rows // n_heads
    if rows != n_heads * h or h % 2:
        raise ValueError(f"cannot split {rows} rows into {n_heads} heads of even size")
    return w.reshape(n_heads, h // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def half_split_to_interleaved(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of :func:`interleaved_to_half_split`."""
    rows, cols = w.shape
    h = rows // n_heads
    if rows != n_heads * h or h % 2:
        raise ValueError(f"cannot split {rows} rows into {n_heads} heads of even size")
    return w.reshape(n_heads, 2, h // 2, cols).swapaxes(1, 2).reshape(rows, cols)


# ---- torch [out, in] (half-split rows for q/k) <-> llama-jax layouts --------------------------------------------

def heads_in(w: np.ndarray, n: int) -> np.ndarray:
    """q/k/v projection [n*H, D] -> [D, n, H]."""
    return w.T.reshape(w.shape[1], n, w.shape[0] // n)


def heads_out(w: np.ndarray) -> np.ndarray:
    """Inverse of :func:`heads_in`: [D, n, H] -> [n*H, D]."""
    d, n, h = w.shape
    return w.reshape(d, n * h).T


def o_in(w: np.ndarray, n: int) -> np.ndarray:
    """Output projection [D, n*H] -> [n, H, D]."""
    return w.T.reshape(n, w.shape[1] // n, w.shape[0])


def o_out(w: np.ndarray) -> np.ndarray:
    """Inverse of :func:`o_in`: [n, H, D] -> [D, n*H]."""
    n, h, d = w.shape
    return w.reshape(n * h, d).T


def transpose(w: np.ndarray) -> np.ndarray:
    """MLP projections and the output head: [out, in] <-> [in, out]."""
    return w.T


def identity(w: np.ndarray) -> np.ndarray:
    """Embeddings [V, D] and norm scales [D]."""
    return w
