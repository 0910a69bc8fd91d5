"""The KV cache: an explicit pytree passed into and returned from every prefill / decode call.

Layout (one array per K and V, all layers stacked so the decoder scan can carry it and update it in place):

  k, v:     [L, B, S, K, H]   layers, batch rows, cache slots (= positions), KV heads, head dim
  lengths:  int32 [B]         tokens stored per row; the next token of row b goes to slot / position lengths[b]

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

    @property
    def max_length(self) -> int:
        return self.k.shape[2]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def replace(self, **changes) -> "KVCache":
        return dataclasses.replace(self, **changes)

    def nbytes(self) -> int:
        return int(self.k.nbytes + self.v.nbytes + self.lengths.nbytes)


def init_cache(config: LlamaConfig, batch_size: int, max_length: int, dtype=jnp.float32,
               sharding=None) -> KVCache:
    """Creates an empty cache (zeros, lengths 0).

    Args:
      config: model architecture (n_layers, n_kv_heads, head_dim).
      batch_size: B rows.
      max_length: S slots per row; at most ``config.max_seq_len``.
      dtype: K/V dtype (the model's compute dtype).
      sharding: optional ``KVCache`` of ``jax.sharding.Sharding`` to create the arrays sharded.

    Raises:
      ValueError: batch_size or max_length not positive, or max_length above the model's context.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 < max_length <= config.max_seq_len:
        raise ValueError(f"max_length must be in [1, {config.max_seq_len}] (the model's context), got {max_length}")
    shape = (config.n_layers, batch_size, max_length, config.n_kv_heads, config.head_dim)

    def make():
        return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                       lengths=jnp.zeros((batch_size,), jnp.int32))

    if sharding is None:
        return make()
    return jax.jit(make, out_shardings=sharding)()


def cache_logical_axes() -> KVCache:
    """A ``KVCache`` whose leaves are the logical axis names of each array."""
    return KVCache(k=CACHE_AXES, v=CACHE_AXES, lengths=LENGTHS_AXES)
