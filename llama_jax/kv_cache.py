"""The KV cache: an explicit pytree passed into and returned from every prefill / decode call.

Layout (one array per K and V, all layers stacked so the decoder scan can carry it and update it in place):

  k, v:     [L, B, S, K, H]   layers, batch rows, cache slots (= positions), KV heads, head dim
  lengths:  int32 [B]         tokens stored per row; the next token of row b goes to slot / position lengths[b]
  k_scale, v_scale: float32 [L, B, S, K] or None   int8 caches only (``kv_dtype="int8"``): one dequantization
            scale per token and KV head (symmetric absmax over the head dim, as MaxText's int8 KV cache), so
            key = k * k_scale[..., None]. int8 K/V take a quarter of the float32 bytes (about half of bf16).

Slot s of row b holds the key/value of position s of that row: each row's positions start at 0 at its first
real token, so rows of different prompt lengths need no left padding and never see each other's padding.
Slots at or beyond a row's length may hold stale values; attention masks them by position (slot <= query
position), and the next write overwrites them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from llama_jax.config import LlamaConfig

#: Logical axis names of ``KVCache.k`` / ``KVCache.v`` (see llama_jax.sharding) and of ``lengths``.
CACHE_AXES = ("layers", "cache_batch", "cache_length", "cache_kv_heads", "cache_head_dim")
LENGTHS_AXES = ("cache_batch",)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys, values and per-row lengths. Shapes in the module docstring."""

    k: jax.Array
    v: jax.Array
    lengths: jax.Array
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None

    @property
    def max_length(self) -> int:
        return self.k.shape[2]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def replace(self, **changes) -> "KVCache":
        return dataclasses.replace(self, **changes)

    @property
    def quantized(self) -> bool:
        """True for an int8 cache (with per-token, per-KV-head scales)."""
        return self.k_scale is not None

    def nbytes(self) -> int:
        return int(sum(x.nbytes for x in jax.tree.leaves(self)))

    def write(self, layer, positions: jax.Array, k: jax.Array, v: jax.Array) -> KVCache:
        """Stores new keys/values [B, T, K, H] of layer ``layer`` at slots ``positions`` (int32 [B, T]); slots
        beyond the cache are dropped. An int8 cache quantizes them (:func:`quantize_kv`). Lengths unchanged."""
        rows = jnp.arange(k.shape[0])[:, None]
        if not self.quantized:
            return self.replace(k=self.k.at[layer, rows, positions].set(k.astype(self.k.dtype), mode="drop"),
                                v=self.v.at[layer, rows, positions].set(v.astype(self.v.dtype), mode="drop"))
        (kq, ks), (vq, vs) = quantize_kv(k), quantize_kv(v)
        return self.replace(k=self.k.at[layer, rows, positions].set(kq, mode="drop"),
                            v=self.v.at[layer, rows, positions].set(vq, mode="drop"),
                            k_scale=self.k_scale.at[layer, rows, positions].set(ks, mode="drop"),
                            v_scale=self.v_scale.at[layer, rows, positions].set(vs, mode="drop"))


def quantize_kv(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 of keys or values [..., H]: (int8 [..., H], float32 scale [...]), x ~= q * scale[..., None].

    One scale per token and KV head: absmax over the head dim / 127 (round to nearest)."""
    xf = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(xf), axis=-1) / 127.0
    q = jnp.round(xf / jnp.where(scale == 0, 1.0, scale)[..., None])
    return jnp.clip(q, -127, 127).astype(jnp.int8), scale


KV_DTYPES = ("float32", "bfloat16", "float16", "int8")


def init_cache(config: LlamaConfig, batch_size: int, max_length: int, dtype=jnp.float32,
               sharding=None, kv_dtype=None) -> KVCache:
    """Creates an empty cache (zeros, lengths 0).

    Args:
      config: model architecture (n_layers, n_kv_heads, head_dim).
      batch_size: B rows.
      max_length: S slots per row; at most ``config.max_seq_len``.
      dtype: K/V dtype (the model's compute dtype).
      sharding: optional ``KVCache`` of ``jax.sharding.Sharding`` to create the arrays sharded.
      kv_dtype: storage dtype overriding ``dtype``: one of ``KV_DTYPES``; "int8" adds float32 scales
        [L, B, S, K] (see the module docstring).

    Raises:
      ValueError: batch_size or max_length not positive, max_length above the model's context, or an unknown
        kv_dtype.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 < max_length <= config.max_seq_len:
        raise ValueError(f"max_length must be in [1, {config.max_seq_len}] (the model's context), got {max_length}")
    if kv_dtype is not None:
        try:
            name = jnp.dtype(kv_dtype).name
        except TypeError:
            name = None
        if name not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")
    dtype = jnp.dtype(kv_dtype if kv_dtype is not None else dtype)
    shape = (config.n_layers, batch_size, max_length, config.n_kv_heads, config.head_dim)

    def make():
        scales = {}
        if dtype == jnp.int8:
            scales = dict(k_scale=jnp.zeros(shape[:-1], jnp.float32), v_scale=jnp.zeros(shape[:-1], jnp.float32))
        return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                       lengths=jnp.zeros((batch_size,), jnp.int32), **scales)

    if sharding is None:
        return make()
    return jax.jit(make, out_shardings=sharding)()


def cache_logical_axes() -> KVCache:
    """A ``KVCache`` whose leaves are the logical axis names of each array."""
    return KVCache(k=CACHE_AXES, v=CACHE_AXES, lengths=LENGTHS_AXES)
