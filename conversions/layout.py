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


# ---- the one table: llama-jax parameter name -> (torch -> ours, ours -> torch) --------------------------------
# Every source reader yields PyTorch-layout [out, in] matrices with q/k rows already in the half-split order (Meta
# and GGUF readers call interleaved_to_half_split, Hugging Face needs nothing); every exporter takes them back.


def _heads(n_attr):
    return (lambda w, c: heads_in(w, getattr(c, n_attr))), (lambda w, c: heads_out(w))


PARAM_LAYOUT = {
    "embedder.embedding": (lambda w, c: identity(w), lambda w, c: identity(w)),
    "final_norm.scale": (lambda w, c: identity(w), lambda w, c: identity(w)),
    "lm_head": (lambda w, c: transpose(w), lambda w, c: transpose(w)),
    "layers.attention_norm.scale": (lambda w, c: identity(w), lambda w, c: identity(w)),
    "layers.attention.q_proj": _heads("n_heads"),
    "layers.attention.k_proj": _heads("n_kv_heads"),
    "layers.attention.v_proj": _heads("n_kv_heads"),
    "layers.attention.o_proj": (lambda w, c: o_in(w, c.n_heads), lambda w, c: o_out(w)),
    "layers.ffn_norm.scale": (lambda w, c: identity(w), lambda w, c: identity(w)),
    "layers.mlp.gate_proj": (lambda w, c: transpose(w), lambda w, c: transpose(w)),
    "layers.mlp.up_proj": (lambda w, c: transpose(w), lambda w, c: transpose(w)),
    "layers.mlp.down_proj": (lambda w, c: transpose(w), lambda w, c: transpose(w)),
}

GLOBAL_PARAMS = ("embedder.embedding", "final_norm.scale", "lm_head")
LAYER_PARAMS = tuple(k for k in PARAM_LAYOUT if k.startswith("layers."))


def torch_to_ours(name: str, w: np.ndarray, config) -> np.ndarray:
    """PyTorch-layout tensor (half-split q/k rows) of llama-jax parameter ``name`` -> its llama-jax layout
    (one layer's slice for ``layers.*``)."""
    return np.ascontiguousarray(PARAM_LAYOUT[name][0](w, config))


def ours_to_torch(name: str, w: np.ndarray, config) -> np.ndarray:
    """Inverse of :func:`torch_to_ours`."""
    return np.ascontiguousarray(PARAM_LAYOUT[name][1](w, config))


def torch_shape(name: str, config) -> tuple[int, ...]:
    """Expected PyTorch [out, in] shape of parameter ``name`` (one layer) for ``config``."""
    d, h, f, v = config.dim, config.head_dim, config.hidden_dim, config.vocab_size
    return {
        "embedder.embedding": (v, d),
        "final_norm.scale": (d,),
        "lm_head": (v, d),
        "layers.attention_norm.scale": (d,),
        "layers.ffn_norm.scale": (d,),
        "layers.attention.q_proj": (config.n_heads * h, d),
        "layers.attention.k_proj": (config.n_kv_heads * h, d),
        "layers.attention.v_proj": (config.n_kv_heads * h, d),
        "layers.attention.o_proj": (d, config.n_heads * h),
        "layers.mlp.gate_proj": (f, d),
        "layers.mlp.up_proj": (f, d),
        "layers.mlp.down_proj": (d, f),
    }[name]
