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

from llama_jax import cpu_kernels
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
    #: set while k/v hold the uint16 bit patterns of a 16-bit float cache (:meth:`as_bits`): that dtype's name.
    bits_of: str | None = dataclasses.field(default=None, metadata=dict(static=True))

    def as_bits(self) -> KVCache:
        """A bfloat16/float16 cache with k/v viewed as their uint16 bit patterns (other caches: unchanged).

        The model's layer loop writes the view (:meth:`write`) and the attention reads it (``kv_bits_of``), so
        XLA:CPU, which has no bfloat16 scatter, neither widens the cache to float32 nor re-views the whole cache
        around every layer's write (:func:`scatter_set` does the latter; measured 132 ms of a batch-32 step)."""
        if self.bits_of is not None or not _is_16bit_float(self.k.dtype):
            return self
        bits = lambda x: jax.lax.bitcast_convert_type(x, jnp.uint16)  # noqa: E731
        return self.replace(k=bits(self.k), v=bits(self.v), bits_of=jnp.dtype(self.k.dtype).name)

    def as_floats(self) -> KVCache:
        """Inverse of :meth:`as_bits`."""
        if self.bits_of is None:
            return self
        floats = lambda x: jax.lax.bitcast_convert_type(x, jnp.dtype(self.bits_of))  # noqa: E731
        return self.replace(k=floats(self.k), v=floats(self.v), bits_of=None)

    @property
    def max_length(self) -> int:
        return self.k.shape[2]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def replace(self, **changes) -> KVCache:
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
        if self.bits_of is None and cpu_kernels.cache_in_place(self.k):  # in place, no uint16 view (XLA:CPU)
            return self.replace(
                k=cpu_kernels.cache_write(self.k, layer, positions, k),
                v=cpu_kernels.cache_write(self.v, layer, positions, v),
            )
        if self.bits_of is not None:  # a uint16 view (as_bits): write the bit patterns of the cache's dtype
            k, v = (jax.lax.bitcast_convert_type(x.astype(self.bits_of), jnp.uint16) for x in (k, v))
        if not self.quantized:
            return self.replace(
                k=scatter_set(self.k, (layer, rows, positions), k),
                v=scatter_set(self.v, (layer, rows, positions), v),
            )
        (kq, ks), (vq, vs) = quantize_kv(k), quantize_kv(v)
        return self.replace(
            k=scatter_set(self.k, (layer, rows, positions), kq),
            v=scatter_set(self.v, (layer, rows, positions), vq),
            k_scale=self.k_scale.at[layer, rows, positions].set(ks, mode="drop"),
            v_scale=self.v_scale.at[layer, rows, positions].set(vs, mode="drop"),
        )


def _is_16bit_float(dtype) -> bool:
    return jnp.dtype(dtype).itemsize == 2 and jnp.issubdtype(dtype, jnp.floating)


def scatter_set(buffer: jax.Array, index: tuple, values: jax.Array) -> jax.Array:
    """``buffer.at[index].set(values, mode="drop")`` (values cast to the buffer's dtype; indices out of range are
    dropped), with 16-bit float buffers scattered as their uint16 bit patterns.

    XLA:CPU has no bfloat16 scatter: its float normalization widens one to float32, which converts the whole
    buffer to float32 and back around every write (measured: 4 full-cache converts per layer and decode step, 400 ms
    of a 500 ms batch-32 step on SmolLM2 with a bf16 cache). A "set" scatter only moves bits, so scattering the bit
    patterns is exact on every backend, and a same-width bitcast is free.
    """
    values = values.astype(buffer.dtype)
    if not _is_16bit_float(buffer.dtype):
        return buffer.at[index].set(values, mode="drop")
    bits = jax.lax.bitcast_convert_type(buffer, jnp.uint16)
    bits = bits.at[index].set(jax.lax.bitcast_convert_type(values, jnp.uint16), mode="drop")
    return jax.lax.bitcast_convert_type(bits, buffer.dtype)


def quantize_kv(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 of keys or values [..., H]: (int8 [..., H], float32 scale [...]), x ~= q * scale[..., None].

    One scale per token and KV head: absmax over the head dim / 127 (round to nearest)."""
    xf = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(xf), axis=-1) / 127.0
    q = jnp.round(xf / jnp.where(scale == 0, 1.0, scale)[..., None])
    return jnp.clip(q, -127, 127).astype(jnp.int8), scale


KV_DTYPES = ("float32", "bfloat16", "float16", "int8")


def init_cache(
    config: LlamaConfig, batch_size: int, max_length: int, dtype=jnp.float32, sharding=None, kv_dtype=None
) -> KVCache:
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
        return KVCache(
            k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), lengths=jnp.zeros((batch_size,), jnp.int32), **scales
        )

    if sharding is None:
        return make()
    return jax.jit(make, out_shardings=sharding)()


def cache_logical_axes() -> KVCache:
    """A ``KVCache`` whose leaves are the logical axis names of each array."""
    return KVCache(k=CACHE_AXES, v=CACHE_AXES, lengths=LENGTHS_AXES)


# ----------------------------------------------------------------------------------------------------------------
# Paged KV cache (issue 16): a pool of pages of P tokens per layer and a page table per row
# ----------------------------------------------------------------------------------------------------------------
#
#   k_pages, v_pages: [L, N, P, K, H]   layers, pages of the pool, slots of a page, KV heads, head dim
#   page_table:       int32 [B, M]      the pool pages of row b in order: slot s of the row is slot s % P of page
#                                       page_table[b, s // P]; entries past a row's pages are ignored
#   lengths:          int32 [B]         tokens stored per row
#
# A row holds only the pages its tokens use (vLLM's PagedAttention, Kwon et al. 2023, "Efficient Memory Management
# for Large Language Model Serving with PagedAttention", SOSP, section 4.1). The host-side allocator and the prefix
# cache that shares full pages between rows are in llama_jax.scheduler (PagePool). The model writes a PagedKVCache
# through PagedKVCache.write and attends over it with llama_jax.attention.paged_attend (an online softmax over
# blocks of pages fetched through the page table, only up to the longest row); paged_attention below gathers a
# row's pages into dense slots instead (kept as the simple twin for tests).

PAGED_CACHE_AXES = ("layers", None, None, "cache_kv_heads", "cache_head_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    """Pages of keys/values, a page table per row, per-row lengths. Shapes in the section comment above."""

    k_pages: jax.Array
    v_pages: jax.Array
    page_table: jax.Array
    lengths: jax.Array

    @property
    def page_size(self) -> int:
        return self.k_pages.shape[2]

    @property
    def num_pages(self) -> int:
        return self.k_pages.shape[1]

    @property
    def max_length(self) -> int:
        """Slots a row can address: pages per row x page size."""
        return self.page_table.shape[1] * self.page_size

    def replace(self, **changes) -> PagedKVCache:
        return dataclasses.replace(self, **changes)

    def nbytes(self) -> int:
        return int(self.k_pages.nbytes + self.v_pages.nbytes + self.page_table.nbytes + self.lengths.nbytes)

    @property
    def quantized(self) -> bool:
        return False

    def write(self, layer, positions: jax.Array, k: jax.Array, v: jax.Array) -> PagedKVCache:
        """Stores new keys/values [B, T, K, H] of layer ``layer`` at token ``positions`` (int32 [B, T]) of each row
        through its page table (:func:`paged_write`; positions on unused entries, >= ``num_pages``, are dropped).
        The same contract as :meth:`KVCache.write`, so the model writes either cache."""
        return paged_write(self, layer, positions, k, v)


def init_paged_cache(
    config: LlamaConfig, num_pages: int, page_size: int, batch_size: int, pages_per_row: int, dtype=jnp.float32
) -> PagedKVCache:
    """An empty page pool (zeros) with page tables of ``pages_per_row`` entries (all page 0) and lengths 0.

    Raises ValueError for a non-positive size or rows longer than the model's context.
    """
    for name, v in (
        ("num_pages", num_pages),
        ("page_size", page_size),
        ("batch_size", batch_size),
        ("pages_per_row", pages_per_row),
    ):
        if v <= 0:
            raise ValueError(f"{name} must be positive, got {v}")
    if pages_per_row * page_size > config.max_seq_len + page_size - 1:
        raise ValueError(
            f"pages_per_row {pages_per_row} x page_size {page_size} exceeds the model's context {config.max_seq_len}"
        )
    shape = (config.n_layers, num_pages, page_size, config.n_kv_heads, config.head_dim)
    return PagedKVCache(
        k_pages=jnp.zeros(shape, dtype),
        v_pages=jnp.zeros(shape, dtype),
        page_table=jnp.zeros((batch_size, pages_per_row), jnp.int32),
        lengths=jnp.zeros((batch_size,), jnp.int32),
    )


def gather_pages(pages: jax.Array, page_table: jax.Array) -> jax.Array:
    """The dense slots of each row: pages [L, N, P, K, H] and page_table int32 [B, M] -> [L, B, M*P, K, H]."""
    g = jnp.take(pages, page_table, axis=1)  # [L, B, M, P, K, H]
    n_layers, b, m, p = g.shape[:4]
    return g.reshape(n_layers, b, m * p, *g.shape[4:])


def paged_write(cache: PagedKVCache, layer: int, positions: jax.Array, k: jax.Array, v: jax.Array) -> PagedKVCache:
    """Stores this layer's new keys/values k, v [B, T, K, H] at token ``positions`` int32 [B, T] of each row
    (slot s goes to page page_table[b, s // P], slot s % P). Positions beyond the row's table are dropped."""
    p = cache.page_size
    m = cache.page_table.shape[1]
    idx = jnp.clip(positions // p, 0, m - 1)
    page = jnp.take_along_axis(cache.page_table, idx, axis=1)  # [B, T]
    page = jnp.where(positions // p < m, page, cache.num_pages)  # out of range: dropped
    slot = positions % p
    kp = scatter_set(cache.k_pages, (layer, page, slot), k)
    vp = scatter_set(cache.v_pages, (layer, page, slot), v)
    return cache.replace(k_pages=kp, v_pages=vp)


def paged_attention(q: jax.Array, cache: PagedKVCache, layer: int, q_positions: jax.Array) -> jax.Array:
    """Causal GQA attention of queries q [B, T, N, H] (at ``q_positions`` int32 [B, T]) over the pages of each
    row in ``layer``: the row's pages are gathered into dense slots and fed to the model's attention
    (:func:`llama_jax.model.dot_product_attention`, slot s = position s, visible when s <= the query position).
    Returns [B, T, N, H] in q's dtype."""
    from llama_jax.model import attention_mask, dot_product_attention

    k = gather_pages(cache.k_pages[layer][None], cache.page_table)[0]  # [B, S, K, H]
    v = gather_pages(cache.v_pages[layer][None], cache.page_table)[0]
    b, s = k.shape[:2]
    k_positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    mask = attention_mask(q_positions, k_positions)  # [B, T, S]
    return dot_product_attention(q, k, v, mask)
