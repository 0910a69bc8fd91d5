"""Attention: every implementation behind one function, :func:`attend`.

Implementations (chosen by :func:`attend` from the backend, dtypes and shapes, or named by ``implementation``):

* ``"blockwise"`` (the XLA path; CPU and the general fallback): online softmax over key/value blocks with a
  float32 running max and sum, as in flash attention (Dao et al., arXiv:2205.14135, algorithm 1) and in Rabe &
  Staats, "Self-attention does not need O(n^2) memory" (arXiv:2112.05682, section 2). Score memory is
  O(T x block) per head, independent of the cache length S. Against a KV cache a query chunk visits only the key
  blocks up to its own last position (a dynamic trip count computed from the positions: a decode step reads
  ``ceil(max(lengths) / block)`` blocks, a prefill chunk the blocks up to its last token); blocks past it are
  never read. Within the last block, keys beyond a query's position are masked.
* ``"cudnn"``: ``jax.nn.dot_product_attention(..., implementation="cudnn")`` (GPU, bf16/fp16, float caches), given
  per-row key lengths or cuDNN's own causal mask instead of a dense [B, T, S] mask where that is exact (see
  :func:`cudnn_attention`); chunks it cannot express that way go to the blockwise path.
* ``"splash"``: the Pallas TPU splash attention kernel JAX ships (``jax.experimental.pallas.ops.tpu.
  splash_attention``, native GQA, causal mask and segment ids) for self-attention (``cached=False``) whose length
  is a multiple of 128 (see :func:`splash_attention`); on a backend other than TPU it runs in Pallas's interpret
  mode (slow; used by the tests).
* ``"reference"``: :func:`reference_attention`, the dense einsum form with a [B, T, S] mask (the test oracle).

GQA groups the queries ``[B, T, K, G, H]`` against the un-repeated keys ``[B, S, K, H]``
(``'BTKGH,BSKH->BKGTS'``); K/V are never tiled. Einsum letters as in :mod:`llama_jax.model`.

Masking rules (the same in every implementation):

* cached (``cached=True``): key slot s of row b holds position s (see :mod:`llama_jax.kv_cache`); query at
  position p attends to slots s <= p.
* self-attention (``cached=False``, keys are the T query tokens themselves, S = T): query i attends to key j when
  j <= i, position[j] <= position[i] and (with ``segment_ids``) segment[j] == segment[i] (packed documents).

The block loop (:func:`online_softmax`) takes a function that fetches key/value block i, so a paged cache (a
page pool and a page table) reuses it unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from llama_jax import cpu_kernels

IMPLEMENTATIONS = ("blockwise", "cudnn", "reference", "splash", "xla")
#: Default key block (and query block in self-attention): score tiles of 512 x 512 per head.
DEFAULT_BLOCK = 512
#: Default key block of decode-sized query chunks (T <= 16): fewer, larger blocks (the loop's per-iteration cost
#: dominates a 1-query tile; measured on XLA:CPU, a 32K-slot decode read is ~2.5x faster with 2048 than 512).
DECODE_BLOCK = 2048
#: Key block of the tail of a decode-sized cached read: the slots past the last whole ``DECODE_BLOCK`` up to the
#: longest row's position are read in blocks of this size, so a step reads at most this many slots it does not
#: need (not up to ``DECODE_BLOCK``; measured on SmolLM2 at position 64 of a 1024-slot cache: a step read the
#: whole cache, 47 MB, as much as its int8 weights).
DECODE_TAIL_BLOCK = 256
_NEG = float(jnp.finfo(jnp.float32).min)
#: query chunks longer than this take the softmax's row sum from a ones column of the P.V dot (one pass less over
#: the [G*T, C] probabilities); decode-sized chunks sum directly (their probability tile is small).
ONES_COLUMN_MIN_T = 16
#: decode-sized chunks with K * N * T at most this read their key/value blocks in the stored order
#: (:func:`_stored_order_update`); larger ones transpose each block to [B, K, C, H].
STORED_ORDER_MAX = 64


# ------------------------------------------------------------------------------------------- oracle
def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Dense grouped-query attention: the test oracle (the einsum form of ``llama_models/llama3/model.py``).

    Args:
      q: [B, T, N, H] queries (RoPE applied).
      k, v: [B, S, K, H] keys and values, K dividing N (query head n reads KV head n // (N / K)).
      mask: bool [B, T, S], True where query t may attend to key s.

    Returns:
      [B, T, N, H] in q's dtype; scores and softmax in float32.
    """
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(b, t, kv_heads, n // kv_heads, h)  # [B, T, K, G, H]
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k.astype(q.dtype), preferred_element_type=jnp.float32)
    scores = scores * jnp.float32(h**-0.5)  # [B, K, G, T, S]
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v.astype(q.dtype))  # [B, T, K, G, H]
    return out.reshape(b, t, n, h).astype(q.dtype)


def dense_mask(
    q_positions: jax.Array,
    s: int,
    *,
    cached: bool,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """The bool [B, T, S] mask of the masking rules in the module docstring (for the oracle and cuDNN)."""
    if cached:
        slots = jnp.arange(s, dtype=jnp.int32)
        return slots[None, None, :] <= q_positions[:, :, None]
    t = q_positions.shape[1]
    idx = jnp.arange(t)
    mask = (idx[None, :] <= idx[:, None])[None] & (q_positions[:, None, :] <= q_positions[:, :, None])
    if segment_ids is not None:
        mask &= segment_ids[:, :, None] == segment_ids[:, None, :]
    return mask


# ------------------------------------------------------------------------------------------- block loop
def online_softmax(
    q: jax.Array,
    fetch: Callable,
    mask_block: Callable,
    num_blocks,
    *,
    n_kv_heads: int,
    skip: Callable | None = None,
    unmasked=None,
    cache_blocks: bool = False,
    tail: tuple[Callable, Callable, jax.Array] | None = None,
) -> jax.Array:
    """Attention of ``q`` over key/value blocks 0..num_blocks-1 with an online (streaming) softmax.

    Args:
      q: [B, T, N, H] queries.
      fetch: ``fetch(i) -> (k, v, k_scale, v_scale)``: block i, k/v [B, C, K, H] (float, or int8 with
        float32 scales [B, C, K] per token and KV head; scales None for float blocks).
      mask_block: ``mask_block(i) -> bool [B, T, C]``, True where a query may attend to a key of block i.
      num_blocks: a Python int (static trip count: a scan, reverse-differentiable) or an int32 scalar (dynamic
        trip count: a while loop, forward only).
      n_kv_heads: K.
      skip: optional ``skip(i) -> bool scalar``: block i is fully masked; it is not computed (``lax.cond``).
      unmasked: optional number of leading blocks (Python int or int32 scalar, <= num_blocks) that every query
        sees whole: blocks 0..unmasked-1 run in a loop of their own without ``mask_block`` (and without ``skip``),
        so they cost two dots, a row max and one exp per score; the rest run masked.
      cache_blocks: the blocks are slices of a KV cache (each a copy when transposed): decode-sized chunks then
        read them in their stored order (:func:`_stored_order_update`).
      tail: optional ``(fetch, mask_block, num)``: after blocks 0..num_blocks-1, ``num`` (an int32 scalar) more
        blocks, masked, fetched by the tail's own functions (blocks of another size: :func:`_blockwise_cached`).

    Returns:
      [B, T, N, H] in q's dtype; scores, running max, running sum and the accumulator in float32.

    Layout (XLA:CPU, measured: 4-5x faster than scores in [B, T, K, G, S] order): the queries are transposed once,
    outside the loop, to [B, K, G, T, H], and each block to [B, K, C, H], so a block's score dot is one
    [G*T, H] x [H, C] matmul per KV head with the contracted axis last on both sides and its [G*T, C] output already
    in the order the softmax reduces over; the softmax scale 1/sqrt(H) is applied inside the exp (m is kept in
    unscaled units); for float blocks of chunks longer than :data:`ONES_COLUMN_MIN_T` the running sum comes out of
    the P.V dot through a column of ones appended to the value block, so the score tile is not read again (int8
    blocks keep their scales on the scores and the probabilities, as before: greedy tokens of an int8 cache are
    sensitive to that rounding order). Decode-sized chunks over cache blocks (K * N * T <=
    :data:`STORED_ORDER_MAX`) skip the per-block transposes instead: :func:`_stored_order_update` (measured on
    SmolLM2 after a 4000-token prompt: the transposing copies took 32 ms of a 66 ms step; decode 15 -> 20 tok/s).
    Key block: :data:`DEFAULT_BLOCK` (512) for prefill chunks; measured at chunk 512 against 8K-16K caches (head
    dims 32 and 64), 256 is as fast and 1024 is 10-25% slower.
    """
    b, t, n, h = q.shape
    kh = n_kv_heads
    g = n // kh
    dtype = q.dtype
    qk = jnp.transpose(q.reshape(b, t, kh, g, h), (0, 2, 3, 1, 4))  # [B, K, G, T, H]
    scale = jnp.float32(h**-0.5)

    def update_transposed(fetch, mask_block, i, carry, masked):
        m, l_sum, acc = carry  # [B, K, G, T], [B, K, G, T], [B, K, G, T, H]
        k, v, k_scale, v_scale = fetch(i)  # [B, C, K, H], scales [B, C, K]
        kt = jnp.transpose(k.astype(dtype), (0, 2, 1, 3))  # [B, K, C, H]
        vt = jnp.transpose(v.astype(dtype), (0, 2, 1, 3))  # [B, K, C, H]
        s = jnp.einsum("BKGTH,BKCH->BKGTC", qk, kt, preferred_element_type=jnp.float32)  # unscaled [B, K, G, T, C]
        if k_scale is not None:
            s = s * jnp.transpose(k_scale, (0, 2, 1))[:, :, None, None, :]
        if masked:
            mask = mask_block(i)[:, None, None]  # [B, 1, 1, T, C]
            s = jnp.where(mask, s, _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.exp((s - m_new[..., None]) * scale)  # [B, K, G, T, C]
        if masked:
            p = jnp.where(mask, p, 0.0)
        corr = jnp.exp((m - m_new) * scale)
        if v_scale is not None or t <= ONES_COLUMN_MIN_T:  # int8 values: scales on the probabilities
            l_sum = l_sum * corr + jnp.sum(p, axis=-1)
            if v_scale is not None:
                p = p * jnp.transpose(v_scale, (0, 2, 1))[:, :, None, None, :]
            pv = jnp.einsum("BKGTC,BKCH->BKGTH", p.astype(dtype), vt, preferred_element_type=jnp.float32)
            return m_new, l_sum, acc * corr[..., None] + pv
        v1 = jnp.concatenate([vt, jnp.ones(vt.shape[:-1] + (1,), dtype)], axis=-1)  # [B, K, C, H + 1]
        pv = jnp.einsum("BKGTC,BKCH->BKGTH", p.astype(dtype), v1, preferred_element_type=jnp.float32)
        return m_new, l_sum * corr + pv[..., h], acc * corr[..., None] + pv[..., :h]

    def make_update(fetch, mask_block):
        if cache_blocks and kh * n * t <= STORED_ORDER_MAX:
            return _stored_order_update(q, kh, scale, fetch, mask_block)
        return functools.partial(update_transposed, fetch, mask_block)

    update = make_update(fetch, mask_block)

    def body(i, carry):
        if skip is None:
            return update(i, carry, True)
        return jax.lax.cond(skip(i), lambda c: c, lambda c: update(i, c, True), carry)

    carry = (
        jnp.full((b, kh, g, t), _NEG, jnp.float32),
        jnp.zeros((b, kh, g, t), jnp.float32),
        jnp.zeros((b, kh, g, t, h), jnp.float32),
    )
    first = 0
    if unmasked is not None:
        carry = jax.lax.fori_loop(0, unmasked, lambda i, c: update(i, c, False), carry)
        first = unmasked
    if isinstance(num_blocks, int) and num_blocks == 1 and skip is None and unmasked is None:
        carry = update(0, carry, True)
    else:
        carry = jax.lax.fori_loop(first, num_blocks, body, carry)
    if tail is not None:
        tail_update = make_update(tail[0], tail[1])
        carry = jax.lax.fori_loop(0, tail[2], lambda i, c: tail_update(i, c, True), carry)
    m, l_sum, acc = carry
    out = acc / jnp.maximum(l_sum, jnp.finfo(jnp.float32).tiny)[..., None]  # [B, K, G, T, H]
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, n, h).astype(dtype)


def _stored_order_update(q, n_kv_heads, scale, fetch, mask_block):
    """The block update of :func:`online_softmax` for decode-sized query chunks, reading each key/value block in
    its stored [B, C, K, H] order (no transposing copy).

    The queries become one block-diagonal matrix Q [B, K*H, K*G*T] (column (k, g, t) holds query head (k, g) at
    token t in rows k*H..k*H+H-1, zeros elsewhere), so the scores of all heads are one [C, K*H] x [K*H, K*G*T]
    product per row, and P.V one [K*G*T, C] x [C, K*H] product whose diagonal blocks are the heads' outputs. It
    multiplies K-1 zero blocks per head (K times the useful FLOPs), which pays while the product stays
    memory-bound: :data:`STORED_ORDER_MAX` bounds K * N * T. Same carry and result as the transposed update.
    """
    b, t, n, h = q.shape
    kh, g = n_kv_heads, n // n_kv_heads
    dtype = q.dtype
    eye = jnp.eye(kh, dtype=dtype)
    qg = q.reshape(b, t, kh, g, h)
    q_bd = jnp.einsum("BTKGH,JK->BJHKGT", qg, eye).reshape(b, kh * h, kh * g * t)  # [B, K*H, K*G*T]

    def update(i, carry, masked):
        m, l_sum, acc = carry  # [B, K, G, T], [B, K, G, T], [B, K, G, T, H]
        k, v, k_scale, v_scale = fetch(i)  # [B, C, K, H], scales [B, C, K]
        c = k.shape[1]
        kf = k.astype(dtype).reshape(b, c, kh * h)
        s = jnp.einsum("BCX,BXY->BCY", kf, q_bd, preferred_element_type=jnp.float32).reshape(b, c, kh, g, t)
        if k_scale is not None:
            s = s * k_scale[:, :, :, None, None]
        if masked:
            mask = jnp.transpose(mask_block(i), (0, 2, 1))[:, :, None, None, :]  # [B, C, 1, 1, T]
            s = jnp.where(mask, s, _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.exp((s - m_new[:, None]) * scale)  # [B, C, K, G, T]
        if masked:
            p = jnp.where(mask, p, 0.0)
        corr = jnp.exp((m - m_new) * scale)
        l_sum = l_sum * corr + jnp.sum(p, axis=1)
        if v_scale is not None:
            p = p * v_scale[:, :, :, None, None]
        vf = v.astype(dtype).reshape(b, c, kh * h)
        pv = jnp.einsum(
            "BCY,BCZ->BYZ", p.reshape(b, c, kh * g * t).astype(dtype), vf, preferred_element_type=jnp.float32
        )
        pv = jnp.einsum("BKGTJH,KJ->BKGTH", pv.reshape(b, kh, g, t, kh, h), eye.astype(jnp.float32))
        return m_new, l_sum, acc * corr[..., None] + pv

    return update


def _slice(x, layer, start, size):
    """x[layer, :, start:start+size] of a stacked [L, B, S, ...] array (only the block is read), or
    x[:, start:start+size] of a per-layer [B, S, ...] one."""
    if x is None:
        return None
    if layer is None:
        return jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)
    starts = (layer, 0, start) + (0,) * (x.ndim - 3)
    sizes = (1, x.shape[1], size) + x.shape[3:]
    return jax.lax.dynamic_slice(x, starts, sizes)[0]


def _blockwise_cached(q, k, v, k_scale, v_scale, layer, q_positions, block, bits_of=None, tail_block=None):
    """Queries of positions ``q_positions`` [B, T] against a cache [(L,) B, S, K, H] (uint16 bit patterns of
    ``bits_of`` when given); see :func:`attend`.

    Blocks of ``block`` slots that every query sees whole run unmasked, the rest masked, up to the largest query
    position. With ``tail_block`` (< block), only whole blocks run at ``block`` size; the slots from the last
    whole block to the largest position are read in ``tail_block`` blocks, so a step reads fewer than
    ``tail_block`` slots past what it needs."""
    s = k.shape[-3]
    c = min(block, s)
    n_blocks = -(-s // c)
    top = jnp.max(q_positions)

    def block_of(size):
        def fetch(start):  # a block past the end is read as the last `size` slots (the overlap is masked)
            start = jnp.minimum(start, s - size)
            kb, vb, ks, vs = (_slice(x, layer, start, size) for x in (k, v, k_scale, v_scale))
            if bits_of is not None:
                kb, vb = (jax.lax.bitcast_convert_type(x, jnp.dtype(bits_of)) for x in (kb, vb))
            return kb, vb, ks, vs

        def mask(nominal):
            slots = jnp.minimum(nominal, s - size) + jnp.arange(size, dtype=jnp.int32)  # [C]
            return (slots[None, None, :] <= q_positions[:, :, None]) & (slots >= nominal)[None, None, :]  # [B, T, C]

        return fetch, mask

    fetch_c, mask_c = block_of(c)
    if tail_block is None or tail_block >= c:
        needed = jnp.minimum(top // c + 1, n_blocks).astype(jnp.int32)
        tail = None
    else:
        needed = jnp.minimum((top + 1) // c, s // c).astype(jnp.int32)  # whole blocks up to the largest position
        ct = tail_block
        base = needed * c
        fetch_t, mask_t = block_of(ct)
        tail = (
            lambda j: fetch_t(base + j * ct),
            lambda j: mask_t(base + j * ct),
            jnp.clip((top - base) // ct + 1, 0, -(-(s - base) // ct)).astype(jnp.int32),
        )
    # blocks every query sees whole (all their slots <= the smallest query position): no mask
    unmasked = jnp.clip((jnp.min(q_positions) + 1) // c, 0, needed).astype(jnp.int32)
    return online_softmax(
        q,
        lambda i: fetch_c(i * c),
        lambda i: mask_c(i * c),
        needed,
        n_kv_heads=k.shape[-2],
        unmasked=unmasked,
        cache_blocks=True,
        tail=tail,
    )


def _blockwise_self(q, k, v, q_positions, segment_ids, block):
    """Causal self-attention among T tokens (k/v [B, T, K, H]); query blocks of ``block`` tokens each visit key
    blocks 0..i only (static: differentiable for training)."""
    b, t, n, h = q.shape
    c = min(block, t)
    nq = -(-t // c)
    pad = nq * c - t
    if pad:
        widths = [(0, 0), (0, pad), (0, 0), (0, 0)]
        q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
        q_positions = jnp.pad(q_positions, [(0, 0), (0, pad)])
        if segment_ids is not None:
            segment_ids = jnp.pad(segment_ids, [(0, 0), (0, pad)], constant_values=-1)
    tp = nq * c
    idx = jnp.arange(tp, dtype=jnp.int32)

    def one_query_block(qi, q_blk):
        q_idx = qi * c + jnp.arange(c, dtype=jnp.int32)  # [C]
        q_pos = jax.lax.dynamic_slice_in_dim(q_positions, qi * c, c, axis=1)  # [B, C]
        q_seg = None if segment_ids is None else jax.lax.dynamic_slice_in_dim(segment_ids, qi * c, c, axis=1)

        def fetch(j):
            return (
                jax.lax.dynamic_slice_in_dim(k, j * c, c, axis=1),
                jax.lax.dynamic_slice_in_dim(v, j * c, c, axis=1),
                None,
                None,
            )

        def mask_block(j):
            k_idx = jax.lax.dynamic_slice_in_dim(idx, j * c, c)
            k_pos = jax.lax.dynamic_slice_in_dim(q_positions, j * c, c, axis=1)
            ok = (k_idx[None, :] <= q_idx[:, None])[None] & (k_pos[:, None, :] <= q_pos[:, :, None])
            if q_seg is not None:
                k_seg = jax.lax.dynamic_slice_in_dim(segment_ids, j * c, c, axis=1)
                ok &= q_seg[:, :, None] == k_seg[:, None, :]
            return ok

        if nq == 1:
            return online_softmax(q_blk, fetch, mask_block, 1, n_kv_heads=k.shape[2])
        return online_softmax(q_blk, fetch, mask_block, nq, n_kv_heads=k.shape[2], skip=lambda j: j > qi)

    if nq == 1:
        out = one_query_block(0, q)
    else:
        q_blocks = jnp.moveaxis(q.reshape(b, nq, c, n, h), 1, 0)  # [nq, B, C, N, H]
        out = jax.lax.map(lambda a: one_query_block(a[0], a[1]), (jnp.arange(nq, dtype=jnp.int32), q_blocks))
        out = jnp.moveaxis(out, 0, 1).reshape(b, tp, n, h)
    return out[:, :t]


# ------------------------------------------------------------------------------------------- backends
def positions_follow_index(q_positions: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """bool scalar: in self-attention the position rule adds nothing to causality by index and segment.

    True when every row's segment ids never decrease along the row (segments are contiguous) and positions never
    decrease within a segment: then key j <= query i of the same segment has position[j] <= position[i], so a kernel
    that masks only by index (and segment) computes the masking rules of the module docstring exactly. Holds for
    positions 0..T-1 and for packed documents whose positions restart at each segment.
    """
    rising = q_positions[:, 1:] >= q_positions[:, :-1]  # [B, T-1]
    if segment_ids is None:
        return jnp.all(rising)
    step = segment_ids[:, 1:] - segment_ids[:, :-1]
    return jnp.all((step > 0) | ((step == 0) & rising))


def _blockwise(
    q, k, v, q_positions, *, cached, segment_ids, k_scale, v_scale, layer, block, bits_of=None, tail_block=None
):
    if cached:
        return _blockwise_cached(q, k, v, k_scale, v_scale, layer, q_positions, block, bits_of, tail_block)
    if layer is not None or k_scale is not None or bits_of is not None:
        raise ValueError("self-attention (cached=False) takes per-layer float k/v")
    return _blockwise_self(q, k, v, q_positions, segment_ids, block)


#: query sub-chunk of the cuDNN path's blockwise fallback for long cached chunks.
FALLBACK_QUERY_BLOCK = 4096


def cudnn_attention(
    q, k, v, q_positions, *, cached, segment_ids=None, layer=None, block=DEFAULT_BLOCK, implementation="cudnn"
):
    """``jax.nn.dot_product_attention`` with the masking rules of the module docstring, cheapest form first.

    * decode (cached, T == 1): ``key_value_seq_lengths = position + 1`` per row (slot s <= position), no mask;
    * a cached chunk starting at position 0 in every row (positions == 0..T-1, a prompt's prefill): cuDNN's causal
      mask against slots 0..T-1 only (slots >= T are past every query); any other chunk (a later chunk of a chunked
      prefill, ragged rows) goes to the blockwise path (``lax.cond`` on the positions);
    * self-attention without segment ids: cuDNN's causal mask where :func:`positions_follow_index`, else blockwise;
    * self-attention with segment ids: a dense [B, 1, T, T] mask.

    Args:
      q: [B, T, N, H]; k, v: [(L,) B, S, K, H] float (a stacked cache with ``layer``); q_positions: int32 [B, T].
      implementation: ``"cudnn"``; ``"xla"`` runs the same arguments through JAX's XLA implementation (the tests
        check the argument choice on CPU this way).

    Returns:
      [B, T, N, H] in q's dtype.
    """
    b, t, n, h = q.shape
    dtype = q.dtype

    def sdpa(kk, vv, **kw):
        return jax.nn.dot_product_attention(q, kk.astype(dtype), vv.astype(dtype), implementation=implementation, **kw)

    def blockwise():
        if cached and t > FALLBACK_QUERY_BLOCK and t % FALLBACK_QUERY_BLOCK == 0:
            # query sub-chunks in sequence: the fallback's score tiles stay FALLBACK_QUERY_BLOCK x block (a branch of
            # lax.cond is allocated even when the other one runs)
            n_sub = t // FALLBACK_QUERY_BLOCK
            qs = jnp.moveaxis(q.reshape(b, n_sub, FALLBACK_QUERY_BLOCK, n, h), 1, 0)  # [n_sub, B, C, N, H]
            ps = jnp.moveaxis(q_positions.reshape(b, n_sub, FALLBACK_QUERY_BLOCK), 1, 0)
            out = jax.lax.map(lambda a: _blockwise_cached(a[0], k, v, None, None, layer, a[1], block), (qs, ps))
            return jnp.moveaxis(out, 0, 1).reshape(b, t, n, h)
        return _blockwise(
            q,
            k,
            v,
            q_positions,
            cached=cached,
            segment_ids=segment_ids,
            k_scale=None,
            v_scale=None,
            layer=layer,
            block=block,
        )

    if cached:
        s = k.shape[-3]
        if t == 1:
            kk, vv = (x if layer is None else x[layer] for x in (k, v))
            lengths = jnp.minimum(q_positions[:, 0] + 1, s).astype(jnp.int32)
            return sdpa(kk, vv, key_value_seq_lengths=lengths)
        if t > s:
            return blockwise()

        def causal_from_zero():
            kk, vv = (_slice(x, layer, 0, t) for x in (k, v))  # slots 0..T-1: [B, T, K, H]
            return sdpa(kk, vv, is_causal=True)

        from_zero = jnp.all(q_positions == jnp.arange(t, dtype=q_positions.dtype)[None])
        return jax.lax.cond(from_zero, causal_from_zero, blockwise)
    if segment_ids is not None:
        mask = dense_mask(q_positions, t, cached=False, segment_ids=segment_ids)
        return sdpa(k, v, mask=mask[:, None])
    return jax.lax.cond(positions_follow_index(q_positions), lambda: sdpa(k, v, is_causal=True), blockwise)


#: splash attention tiles: the largest of these dividing the length (all multiples of the TPU's 128 lanes).
SPLASH_BLOCKS = (512, 256, 128)


def splash_fits(t: int, head_dim: int) -> bool:
    """Shapes the TPU splash kernel is chosen for automatically: length a multiple of 128, head dim of 128 or 256."""
    return t % 128 == 0 and head_dim in (128, 256)


@functools.lru_cache(maxsize=32)
def _splash_kernel(n_heads: int, t: int, block: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    mask = sm.MultiHeadMask([sm.CausalMask((t, t)) for _ in range(n_heads)])
    sizes = sk.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    return sk, sk.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=interpret)


def splash_attention(q, k, v, q_positions, *, segment_ids=None, block=DEFAULT_BLOCK, interpret=None):
    """Causal self-attention through the Pallas TPU splash attention kernel (``jax.experimental.pallas.ops.tpu.
    splash_attention``, forward and backward kernels).

    The kernel masks by index (causal) and segment id; where :func:`positions_follow_index` does not hold, the
    blockwise path runs instead (``lax.cond``), so the result always follows the module docstring's rules.
    GQA is the kernel's own (query head n reads KV head n // G; K/V are not repeated); the batch is a ``vmap``.

    Args:
      q: [B, T, N, H] (RoPE applied); k, v: [B, T, K, H]; q_positions: int32 [B, T]; segment_ids: int32 [B, T].
      block: the tile is the largest of :data:`SPLASH_BLOCKS` dividing T and <= max(block, 128).
      interpret: run in Pallas's interpret mode; default: on any backend other than TPU.

    Returns:
      [B, T, N, H] in q's dtype.

    Raises:
      ValueError: T not a multiple of 128.
    """
    b, t, n, h = q.shape
    if t % 128:
        raise ValueError(f"splash attention needs a length that is a multiple of 128, got T={t}")
    tile = next(c for c in SPLASH_BLOCKS if t % c == 0 and c <= max(block, 128))
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    sk, kernel = _splash_kernel(n, t, tile, bool(interpret))
    qs = (q.astype(jnp.float32) * jnp.float32(h**-0.5)).astype(q.dtype)  # the kernel does not scale
    qh, kh, vh = (jnp.transpose(x, (0, 2, 1, 3)) for x in (qs, k.astype(q.dtype), v.astype(q.dtype)))  # [B, *, T, H]

    def run():
        if segment_ids is None:
            out = jax.vmap(kernel)(qh, kh, vh)
        else:
            seg = segment_ids.astype(jnp.int32)
            out = jax.vmap(lambda a, b_, c, d: kernel(a, b_, c, segment_ids=sk.SegmentIds(d, d)))(qh, kh, vh, seg)
        return jnp.transpose(out, (0, 2, 1, 3)).astype(q.dtype)  # [B, T, N, H]

    def blockwise():
        return _blockwise_self(q, k, v, q_positions, segment_ids, block)

    return jax.lax.cond(positions_follow_index(q_positions, segment_ids), run, blockwise)


# ------------------------------------------------------------------------------------------- dispatch
def choose_implementation(
    q_dtype,
    kv_dtype,
    *,
    head_dim: int | None = None,
    cached: bool | None = None,
    length: int | None = None,
    backend: str | None = None,
) -> str:
    """The selection rule of :func:`attend` (``implementation=None``).

    * GPU: ``"cudnn"`` for bf16/fp16 queries over a float K/V of the same dtype and (when given) a head dim that is
      a multiple of 8 and at most 128 (cuDNN flash attention's range);
    * TPU: ``"splash"`` for self-attention (``cached=False``) of a length and head dim :func:`splash_fits` accepts,
      on one device (the kernel is a custom call GSPMD cannot partition; a mesh would need it under ``shard_map``);
    * everything else (CPU, int8 caches, float32 on GPU, cached chunks on TPU): ``"blockwise"``.

    ``backend`` defaults to ``jax.default_backend()``; the shape arguments may be omitted (old callers), which
    rules out only the TPU kernel.
    """
    backend = backend or jax.default_backend()
    if backend == "gpu":
        half = jnp.dtype(q_dtype) in (jnp.bfloat16, jnp.float16) and jnp.dtype(kv_dtype) == jnp.dtype(q_dtype)
        if half and (head_dim is None or (head_dim % 8 == 0 and head_dim <= 128)):
            return "cudnn"
    if backend == "tpu" and cached is False and length is not None and head_dim is not None and jax.device_count() == 1:
        if jnp.dtype(kv_dtype) != jnp.int8 and splash_fits(length, head_dim):
            return "splash"
    return "blockwise"


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    *,
    cached: bool,
    segment_ids: jax.Array | None = None,
    k_scale: jax.Array | None = None,
    v_scale: jax.Array | None = None,
    layer=None,
    implementation: str | None = None,
    block_size: int | None = None,
    kv_bits_of: str | None = None,
) -> jax.Array:
    """Grouped-query causal attention: the one attention function of prefill, decode and training.

    Args:
      q: [B, T, N, H] queries (RoPE applied), the compute dtype.
      k, v: keys/values [B, S, K, H], or a stacked cache [L, B, S, K, H] with ``layer`` (an int or int32 scalar)
        naming the layer: the blockwise path then reads only the blocks it needs (slicing a whole layer out of a
        stacked array copies it on XLA:CPU). float, or int8 with ``k_scale`` / ``v_scale``.
      q_positions: int32 [B, T] positions of the queries.
      cached: True: k/v are a KV cache whose slot s holds position s (attend to s <= position); False: k/v are the
        T query tokens themselves (S = T), causal by index and position (see the module docstring).
      segment_ids: int32 [B, T] document ids of packed rows (self-attention only): tokens attend within their own
        segment.
      k_scale, v_scale: float32 [(L,) B, S, K] dequantization scales of an int8 cache (one per token and KV head).
      layer: see k, v.
      implementation: "blockwise" (or "xla"), "cudnn", "splash", "reference", or None (:func:`choose_implementation`;
        on a one-device CPU backend, cached chunks of T <= ``cpu_kernels.ATTENTION_MAX_T`` queries (decode steps,
        verify and prefill chunks) with no ``block_size`` go to the C++ kernel
        :func:`llama_jax.cpu_kernels.decode_attention`, which reads the cache in place).
      block_size: key block C of the blockwise path (and query block of self-attention); default
        ``DECODE_BLOCK`` for cached chunks of T <= 16 queries (the slots past its last whole block read in
        ``DECODE_TAIL_BLOCK`` blocks), else ``DEFAULT_BLOCK``.
      kv_bits_of: "bfloat16" or "float16" when k/v are uint16 bit patterns of that dtype
        (:meth:`llama_jax.kv_cache.KVCache.as_bits`); the blockwise path views only the blocks it reads.

    Returns:
      [B, T, N, H] in q's dtype.

    Raises:
      ValueError: unknown implementation, segment_ids with a cache, cuDNN asked for an int8 cache, splash asked for
        a cache or a length that is not a multiple of 128.
    """
    if cached and segment_ids is not None:
        raise ValueError("segment_ids apply to self-attention only (cached=False)")
    if implementation is None and cached and block_size is None and cpu_kernels.attention_usable(q, k, kv_bits_of):
        return cpu_kernels.decode_attention(
            q, k, v, q_positions, k_scale=k_scale, v_scale=v_scale, layer=layer, bits_of=kv_bits_of
        )
    if implementation is None:
        implementation = choose_implementation(q.dtype, k.dtype, head_dim=q.shape[-1], cached=cached, length=q.shape[1])
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}")
    decode_sized = cached and q.shape[1] <= 16
    tail_block = DECODE_TAIL_BLOCK if decode_sized and block_size is None else None
    if block_size is None:
        block_size = DECODE_BLOCK if decode_sized else DEFAULT_BLOCK
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if kv_bits_of is not None and implementation not in ("blockwise", "xla"):
        k, v = (jax.lax.bitcast_convert_type(x, jnp.dtype(kv_bits_of)) for x in (k, v))
    if implementation in ("blockwise", "xla"):
        return _blockwise(
            q,
            k,
            v,
            q_positions,
            cached=cached,
            segment_ids=segment_ids,
            k_scale=k_scale,
            v_scale=v_scale,
            layer=layer,
            block=block_size,
            bits_of=kv_bits_of,
            tail_block=tail_block,
        )
    if implementation == "splash":
        if cached or layer is not None or k_scale is not None:
            raise ValueError("the splash attention kernel serves self-attention (cached=False) over float k/v")
        return splash_attention(q, k, v, q_positions, segment_ids=segment_ids, block=block_size)
    if implementation == "cudnn":
        if k_scale is not None:
            raise ValueError("the cudnn attention takes a float KV cache, not int8")
        return cudnn_attention(
            q, k, v, q_positions, cached=cached, segment_ids=segment_ids, layer=layer, block=block_size
        )

    # the dense oracle: the layer of a stacked cache, dequantized
    if layer is not None:
        k, v = k[layer], v[layer]
        k_scale = None if k_scale is None else k_scale[layer]
        v_scale = None if v_scale is None else v_scale[layer]
    if k_scale is not None:
        k = k.astype(jnp.float32) * k_scale[..., None]
        v = v.astype(jnp.float32) * v_scale[..., None]
    mask = dense_mask(q_positions, k.shape[1], cached=cached, segment_ids=segment_ids)
    return reference_attention(q, k, v, mask)


# ------------------------------------------------------------------------------------------- paged cache
def paged_attend(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table: jax.Array,
    q_positions: jax.Array,
    *,
    layer=None,
    block_size: int | None = None,
) -> jax.Array:
    """Grouped-query causal attention over a paged KV cache: the blockwise path (:func:`online_softmax`) with
    blocks fetched through each row's page table (vLLM's PagedAttention, Kwon et al. 2023, SOSP, section 4.1;
    the pure-JAX twin of ragged paged attention kernels such as tpu-inference's ``ref_ragged_paged_attention``).

    Args:
      q: [B, T, N, H] queries (RoPE applied) at positions ``q_positions`` int32 [B, T].
      k_pages, v_pages: the page pool, [L, NP, P, K, H] with ``layer`` (an int or int32 scalar) naming the layer,
        or [NP, P, K, H] with ``layer`` None; slot s of row b is slot s % P of page ``page_table[b, s // P]``.
      page_table: int32 [B, M]; the pages a row holds come first, unused entries are ``NP`` (or any value >= NP):
        they are never read into a result (such a block is masked out).
      block_size: key block C (a multiple of P; rounded down to one, at least one page); default as :func:`attend`.

    Only the blocks up to the largest query position among rows that hold pages are visited (a dynamic trip
    count); within a block, slots past a query's position or on unused pages are masked. Only the pages of the
    visited blocks are read (a gather of C / P pages per row and block), never the whole pool.

    Returns:
      [B, T, N, H] in q's dtype; scores and softmax in float32.
    """
    if layer is not None:
        n_pool, p = k_pages.shape[1], k_pages.shape[2]
    else:
        n_pool, p = k_pages.shape[0], k_pages.shape[1]
    b, m = page_table.shape
    if block_size is None:
        block_size = DECODE_BLOCK if q.shape[1] <= 16 else DEFAULT_BLOCK
    g = max(1, min(block_size // p, m))  # pages per block
    n_blocks = -(-m // g)
    pad = n_blocks * g - m
    table = jnp.pad(page_table, [(0, 0), (0, pad)], constant_values=n_pool) if pad else page_table  # [B, nb*G]
    valid = table < n_pool  # [B, nb*G]
    held = jnp.sum(valid[:, :m], axis=1).astype(jnp.int32)  # [B] pages each row holds
    # blocks needed: up to the largest query position of a row that holds pages (idle rows hold none)
    last = jnp.minimum(jnp.max(q_positions, axis=1) // p + 1, held)  # [B] pages needed per row
    needed = jnp.minimum((jnp.max(last) + g - 1) // g, n_blocks).astype(jnp.int32)
    c = g * p

    def fetch(i):
        ids = jax.lax.dynamic_slice_in_dim(table, i * g, g, axis=1)  # [B, G]
        ids = jnp.minimum(ids, n_pool - 1)  # unused entries read some page; masked below
        out = []
        for x in (k_pages, v_pages):
            blk = x[ids] if layer is None else x[layer, ids]  # [B, G, P, K, H]
            out.append(blk.reshape(b, c, *blk.shape[3:]))  # [B, C, K, H]
        return out[0], out[1], None, None

    def mask_block(i):
        slots = i * c + jnp.arange(c, dtype=jnp.int32)  # [C]
        ok_page = jnp.repeat(jax.lax.dynamic_slice_in_dim(valid, i * g, g, axis=1), p, axis=1)  # [B, C]
        return (slots[None, None, :] <= q_positions[:, :, None]) & ok_page[:, None, :]  # [B, T, C]

    kv_heads = k_pages.shape[-2]
    return online_softmax(q, fetch, mask_block, needed, n_kv_heads=kv_heads, cache_blocks=True)
