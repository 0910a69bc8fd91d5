"""Llama 3.x decoder in Flax NNX.

Source: ``llama_models/llama3/model.py`` (Meta's reference) and the Llama 3 paper (arXiv:2407.21783, section 3.2).
Numerics follow the reference: RMSNorm statistics in float32, softmax in float32, RoPE in float32
(:mod:`llama_jax.rope`), logits returned in float32.

Parameters (logical axis names in brackets; the sharding rules table maps them to mesh axes):

  embedder.embedding                 [V, D]        (vocab, embed)
  layers.attention_norm.scale        [L, D]        (layers, embed)
  layers.attention.q_proj            [L, D, N, H]  (layers, embed, q_heads, head_dim)
  layers.attention.k_proj / v_proj   [L, D, K, H]  (layers, embed, kv_heads, head_dim)
  layers.attention.o_proj            [L, N, H, D]  (layers, q_heads, head_dim, embed)
  layers.ffn_norm.scale              [L, D]        (layers, embed)
  layers.mlp.gate_proj / up_proj     [L, D, F]     (layers, embed, mlp)      Meta w1 / w3
  layers.mlp.down_proj               [L, F, D]     (layers, mlp, embed)      Meta w2
  final_norm.scale                   [D]           (embed,)
  lm_head                            [D, V]        (embed, vocab)            absent when embeddings are tied

q_proj and k_proj rows are in the half-split RoPE layout (see :mod:`llama_jax.rope`).

Weight layouts: the table above is the checkpoint's "in_out" layout (contracted input axes first). The decode
layout "out_in" (:meth:`Llama.set_weight_layout`, chosen per backend by :class:`llama_jax.engine.Engine`) moves the
contracted axes of every matmul weight (:data:`CONTRACTED_AXES`) last, e.g. q_proj [L, N, H, D] (layers, q_heads,
head_dim, embed), and permutes the logical axis names with it, so the sharding rules apply unchanged. On XLA:CPU a
matrix-vector product whose weight is contracted on its last, contiguous axis reads a bfloat16 or int8 weight in
place; contracted on its first axis, XLA writes a float32 copy of the whole weight first (measured: 13x slower).
:func:`project` computes every product from the parameter's logical axes, so both layouts run the same code.

Decoder layers are stacked on a leading ``layers`` axis and applied with ``jax.lax.scan``, so compile time does
not grow with depth. :meth:`Llama.unstack_layers` turns them into a list of per-layer blocks (a Python loop in the
compiled program), which XLA:CPU decodes about twice as fast; :meth:`Llama.stack_layers` undoes it.

Einsum letters: B batch, T query length, S key length, D model dim, N query heads, K KV heads, G = N/K,
H head dim, F MLP hidden, V vocab, L layers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from llama_jax import attention, cpu_kernels
from llama_jax.config import LlamaConfig
from llama_jax.kv_cache import KVCache
from llama_jax.rope import apply_rope


def default_dtype() -> jnp.dtype:
    """float32 on CPU (XLA:CPU bf16 matrix-vector products are ~20x slower), bfloat16 on accelerators."""
    return jnp.dtype(jnp.float32) if jax.default_backend() == "cpu" else jnp.dtype(jnp.bfloat16)


#: Matmul weights (by parameter name) -> the logical axes they contract with their input (the "in" axes; the rest
#: are the "out" axes). The same axes are reduced by int8 scales (llama_jax.quant).
CONTRACTED_AXES: dict[str, tuple[str, ...]] = {
    "embedding": ("embed",),
    "lm_head": ("embed",),
    "q_proj": ("embed",),
    "k_proj": ("embed",),
    "v_proj": ("embed",),
    "o_proj": ("q_heads", "head_dim"),
    "gate_proj": ("embed",),
    "up_proj": ("embed",),
    "down_proj": ("mlp",),
}
#: "in_out": contracted axes first (the checkpoint format); "out_in": contracted axes last (the CPU decode layout).
WEIGHT_LAYOUTS = ("in_out", "out_in")


def _is_quantized(value) -> bool:
    return hasattr(value, "q") and hasattr(value, "scale")  # llama_jax.quant.QArray


def _axes(param: nnx.Variable, ndim: int) -> tuple[str, ...]:
    axes = tuple(param.get_metadata().get("out_sharding") or ())
    if len(axes) == ndim + 1 and axes[0] == "layers":  # a layer of a stacked weight (scan)
        axes = axes[1:]
    if len(axes) != ndim:
        raise ValueError(f"parameter of shape ndim {ndim} has logical axes {axes}: cannot tell its layout")
    return axes


def project(x: jax.Array, param: nnx.Variable, name: str, out_dtype=None) -> jax.Array:
    """The product of activations and a matmul weight, in whichever layout the weight is stored.

    Args:
      x: [..., *in] activations, trailing axes the weight's contracted axes (``CONTRACTED_AXES[name]``) in order.
      param: the weight ``nnx.Param``: float [*in, *out] ("in_out") or [*out, *in] ("out_in"), told apart by its
        logical axis names; or an int8 ``llama_jax.quant.QArray`` (q in either layout, per-output-channel scale).
      name: the parameter's name in :data:`CONTRACTED_AXES`.
      out_dtype: accumulation/result dtype (``preferred_element_type``); default x's dtype.

    Returns [..., *out] in ``out_dtype`` (or x's dtype). The weight is cast to x's dtype inside the product, never
    dequantized as a whole: an int8 weight's scale multiplies the [.., out] result (w = q * scale per output
    channel, so x @ w = (x @ q) * scale). Both layouts are one 2-D ``x @ w`` / ``x @ w.T``, the form XLA:CPU
    streams a bf16/int8 "out_in" weight through without a float copy (see the module docstring). On a one-device
    CPU backend, few-row products against "out_in" weights run as :mod:`llama_jax.cpu_kernels` custom
    calls (same values within float32 rounding) and many-row ones as bf16 x bf16 -> f32 dots (:func:`_bf16_matmul`).
    """
    value = param.get_value()
    quantized = _is_quantized(value)
    w = value.q if quantized else value
    n_in = len(CONTRACTED_AXES[name])
    out_in = _axes(param, w.ndim)[0] not in CONTRACTED_AXES[name]
    in_shape, out_shape = (w.shape[-n_in:], w.shape[:-n_in]) if out_in else (w.shape[:n_in], w.shape[n_in:])
    if tuple(x.shape[x.ndim - n_in :]) != tuple(in_shape):
        raise ValueError(f"{name}: activations {x.shape} do not end in the weight's input axes {in_shape}")
    n_i, n_o = math.prod(in_shape), math.prod(out_shape)
    lead = x.shape[: x.ndim - n_in]
    x2 = x.reshape(-1, n_i)
    if out_in and cpu_kernels.usable(w, x2.shape[0]):
        y = cpu_kernels.matmul(x2, w.reshape(n_o, n_i), value.scale if quantized else None)
        y = y.astype(out_dtype or x.dtype)
        quantized = False  # the kernel applied the scale
    elif out_in and x2.shape[0] > 1 and w.dtype == jnp.bfloat16:
        y = _bf16_matmul(x2, w.reshape(n_o, n_i), out_dtype or x.dtype)
    elif out_in and quantized and x2.shape[0] > 1 and jax.default_backend() == "cpu":
        # int8 is exact in bf16: a prefill chunk or a large batch takes the bf16 x bf16 -> f32 product
        y = _bf16_matmul(x2, w.reshape(n_o, n_i).astype(jnp.bfloat16), out_dtype or x.dtype)
    elif out_in:
        y = jnp.matmul(x2, w.reshape(n_o, n_i).astype(x.dtype).T, preferred_element_type=out_dtype)
    else:
        y = jnp.matmul(x2, w.reshape(n_i, n_o).astype(x.dtype), preferred_element_type=out_dtype)
    if quantized:
        y = y * value.scale.reshape(n_o).astype(y.dtype)
    return y.reshape(lead + tuple(out_shape))


def _bf16_matmul(x: jax.Array, w: jax.Array, out_dtype) -> jax.Array:
    """x [R, I] (R > 1 rows) times a bfloat16 "out_in" weight w [O, I] -> [R, O] ``out_dtype``: the rows rounded to
    bfloat16 (a bfloat16 model computes in bfloat16 already), float32 accumulation.

    On XLA:CPU a product of several rows (a prefill chunk, a decode batch, a speculative verify pass) against a
    weight cast in the dot is a loop fusion, measured 5-8x slower than float32, while a bf16 x bf16 -> f32 dot runs
    as a matrix product that reads the weight as stored (YNNPACK; AVX512-BF16 where the CPU has it). Measured on
    SmolLM2-shaped layers: 4 rows float32 41 ms, bf16 23 ms; 32 rows 81 vs 47 ms; 512 rows 674 vs 312 ms. One
    row (batch-1 decode) keeps the cast-in-dot loop, which reads the weight at full bandwidth.

    An int8 weight takes the same product for more rows than :data:`llama_jax.cpu_kernels.MAX_ROWS` (prefill
    chunks): int8 is exact in bfloat16, so only the activations are rounded, as in a bf16 model. Measured at 512
    rows: 381 ms vs 657 ms float32. (int8 x int8 dots would need int8 activations: per-token activation
    quantization (W8A8) turns SmolLM2's first greedy token from 7042 into 260, outlier channels.) Fewer rows, and
    one-row bf16 products, go to :mod:`llama_jax.cpu_kernels` where it is built.
    """
    y = jax.lax.dot_general(x.astype(jnp.bfloat16), w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return y.astype(out_dtype)


def _layout_perm(axes: tuple[str, ...], name: str, layout: str) -> tuple[int, ...]:
    """Permutation taking a weight with logical ``axes`` to ``layout`` (a leading "layers" axis stays first)."""
    lead = [i for i, a in enumerate(axes) if a == "layers"]
    ins = [i for i, a in enumerate(axes) if a in CONTRACTED_AXES[name]]
    outs = [i for i, a in enumerate(axes) if a != "layers" and a not in CONTRACTED_AXES[name]]
    return tuple(lead + (ins + outs if layout == "in_out" else outs + ins))


def _permute_value(value, perm):
    if _is_quantized(value):
        return dataclasses.replace(value, q=jnp.transpose(value.q, perm), scale=jnp.transpose(value.scale, perm))
    return jnp.transpose(value, perm)


def _param(rngs: nnx.Rngs | None, shape, axes, dtype, std: float | None) -> nnx.Param:
    """A parameter with logical axis names as NNX ``out_sharding`` metadata (applied by llama_jax.sharding)."""
    if std is None:
        value = jnp.ones(shape, dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


class RMSNorm(nnx.Module):
    """Root-mean-square layer norm, statistics in float32 (reference ``RMSNorm``). x: [..., D] -> [..., D]."""

    def __init__(self, dim: int, eps: float, *, param_dtype, layers: int | None = None):
        lead = () if layers is None else (layers,)
        axes = ("embed",) if layers is None else ("layers", "embed")
        self.eps = eps
        self.scale = _param(None, lead + (dim,), axes, param_dtype, None)

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return normed.astype(x.dtype) * self.scale[...].astype(x.dtype)


class Embedder(nnx.Module):
    """Token embedding [V, D]; also the output head when embeddings are tied."""

    def __init__(self, vocab_size: int, dim: int, *, param_dtype, rngs: nnx.Rngs):
        self.embedding = _param(rngs, (vocab_size, dim), ("vocab", "embed"), param_dtype, 0.02)

    def encode(self, tokens: jax.Array, dtype) -> jax.Array:
        """int32 [B, T] -> [B, T, D] in ``dtype``. An int8 table (llama_jax.quant) dequantizes only the rows read."""
        table = self.embedding.get_value()
        if hasattr(table, "q") and hasattr(table, "scale"):  # llama_jax.quant.QArray, per-row scales
            rows = jnp.take(table.q, tokens, axis=0).astype(dtype)
            return rows * jnp.take(table.scale, tokens, axis=0).astype(dtype)
        return jnp.take(self.embedding[...], tokens, axis=0).astype(dtype)

    def decode(self, x: jax.Array) -> jax.Array:
        """[B, T, D] -> float32 logits [B, T, V] (tied output head; an int8 table scales the logits per token)."""
        return project(x, self.embedding, "embedding", jnp.float32)  # [B, T, V]


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, implementation: str | None = None
) -> jax.Array:
    """Dense grouped-query attention with an explicit mask (kept for callers; the model uses
    :func:`llama_jax.attention.attend`).

    Args:
      q: [B, T, N, H] queries; k, v: [B, S, K, H]; mask: bool [B, T, S], True where query t may attend to key s.
      implementation: "xla" / "reference" (:func:`llama_jax.attention.reference_attention`), "cudnn", or None
        ("cudnn" on GPU when the dtype allows).

    Returns:
      [B, T, N, H] in q's dtype.
    """
    if implementation is None:
        implementation = attention.choose_implementation(q.dtype, k.dtype)
        implementation = "reference" if implementation == "blockwise" else implementation
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="cudnn")
    if implementation not in ("xla", "reference"):
        raise ValueError(f"attention implementation must be 'xla', 'cudnn' or None, got {implementation!r}")
    return attention.reference_attention(q, k, v, mask)


class Attention(nnx.Module):
    """Multi-head attention with grouped-query KV heads and RoPE (reference ``Attention``)."""

    def __init__(self, config: LlamaConfig, *, param_dtype, rngs: nnx.Rngs, layers: int | None = None):
        lead, lax = ((), ()) if layers is None else ((layers,), ("layers",))
        d, n, k, h = config.dim, config.n_heads, config.n_kv_heads, config.head_dim
        std = 0.02
        self.config = config
        self.q_proj = _param(rngs, lead + (d, n, h), lax + ("embed", "q_heads", "head_dim"), param_dtype, std)
        self.k_proj = _param(rngs, lead + (d, k, h), lax + ("embed", "kv_heads", "head_dim"), param_dtype, std)
        self.v_proj = _param(rngs, lead + (d, k, h), lax + ("embed", "kv_heads", "head_dim"), param_dtype, std)
        self.o_proj = _param(rngs, lead + (n, h, d), lax + ("q_heads", "head_dim", "embed"), param_dtype, std)

    def __call__(self, x, positions, segment_ids=None, kv=None, attention_impl=None, attention_block=None):
        """x: [B, T, D]; positions int32 [B, T]; segment_ids int32 [B, T] or None (packed documents).

        kv: None (causal attention among the T tokens; S = T), or ``(cache, layer)`` with the whole
        :class:`llama_jax.kv_cache.KVCache` (or ``PagedKVCache``: :func:`llama_jax.attention.paged_attend` reads
        each row's pages through its page table) and this layer's index: the new keys/values are written into slots
        ``positions`` of that layer (in place when the buffers are donated), then the queries attend to slots
        <= their positions (:func:`llama_jax.attention.attend`, which reads only the blocks it needs).
        Returns (out [B, T, D], kv').
        """
        q = project(x, self.q_proj, "q_proj")  # [B, T, N, H]
        k = project(x, self.k_proj, "k_proj")  # [B, T, K, H]
        v = project(x, self.v_proj, "v_proj")  # [B, T, K, H]
        q = apply_rope(q, positions, self.config)
        k = apply_rope(k, positions, self.config)
        block = attention_block
        if kv is None:
            out = attention.attend(
                q,
                k,
                v,
                positions,
                cached=False,
                segment_ids=segment_ids,
                implementation=attention_impl,
                block_size=block,
            )
        else:
            cache, layer = kv
            cache = cache.write(layer, positions, k, v)  # [L, B, S, K, H] (or pages [L, NP, P, K, H])
            kv = (cache, layer)
            if hasattr(cache, "page_table"):  # a paged cache (llama_jax.kv_cache.PagedKVCache)
                out = attention.paged_attend(
                    q, cache.k_pages, cache.v_pages, cache.page_table, positions, layer=layer, block_size=block
                )
                return project(out, self.o_proj, "o_proj"), kv  # [B, T, D]
            out = attention.attend(
                q,
                cache.k,
                cache.v,
                positions,
                cached=True,
                k_scale=cache.k_scale,
                v_scale=cache.v_scale,
                kv_bits_of=cache.bits_of,
                layer=layer,
                implementation=attention_impl,
                block_size=block,
            )
        return project(out, self.o_proj, "o_proj"), kv  # [B, T, D]


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)) (reference ``FeedForward``: w2(silu(w1 x) * w3 x))."""

    def __init__(self, config: LlamaConfig, *, param_dtype, rngs: nnx.Rngs, layers: int | None = None):
        lead, lax = ((), ()) if layers is None else ((layers,), ("layers",))
        d, f = config.dim, config.hidden_dim
        self.gate_proj = _param(rngs, lead + (d, f), lax + ("embed", "mlp"), param_dtype, 0.02)
        self.up_proj = _param(rngs, lead + (d, f), lax + ("embed", "mlp"), param_dtype, 0.02)
        self.down_proj = _param(rngs, lead + (f, d), lax + ("mlp", "embed"), param_dtype, 0.02)

    def __call__(self, x):
        gate = project(x, self.gate_proj, "gate_proj")  # [B, T, F]
        up = project(x, self.up_proj, "up_proj")  # [B, T, F]
        return project(jax.nn.silu(gate) * up, self.down_proj, "down_proj")  # [B, T, D]


class Block(nnx.Module):
    """One decoder layer (reference ``TransformerBlock``): pre-norm attention and pre-norm SwiGLU, residuals.

    With ``layers=L`` every parameter gets a leading ``layers`` axis of size L (the stacked form).
    """

    def __init__(self, config: LlamaConfig, *, param_dtype, rngs: nnx.Rngs, layers: int | None = None):
        self.attention_norm = RMSNorm(config.dim, config.norm_eps, param_dtype=param_dtype, layers=layers)
        self.attention = Attention(config, param_dtype=param_dtype, rngs=rngs, layers=layers)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps, param_dtype=param_dtype, layers=layers)
        self.mlp = MLP(config, param_dtype=param_dtype, rngs=rngs, layers=layers)

    def __call__(self, x, positions, segment_ids=None, kv=None, attention_impl=None, attention_block=None):
        h, kv = self.attention(self.attention_norm(x), positions, segment_ids, kv, attention_impl, attention_block)
        x = x + h
        return x + self.mlp(self.ffn_norm(x)), kv


def attention_mask(
    q_positions: jax.Array,
    k_positions: jax.Array,
    q_segments: jax.Array | None = None,
    k_segments: jax.Array | None = None,
) -> jax.Array:
    """Causal mask by position: bool [B, T, S], True where k_position <= q_position (and segments agree).

    The model no longer builds masks (:func:`llama_jax.attention.attend` masks inside its blocks); kept for
    callers and tests."""
    mask = k_positions[:, None, :] <= q_positions[:, :, None]
    if q_segments is not None:
        mask &= q_segments[:, :, None] == k_segments[:, None, :]
    return mask


def _split_layers(value, n: int) -> list:
    """The n leading-axis slices of a stacked array (or QArray), made by one jitted call."""
    return jax.jit(lambda a: [jax.tree.map(lambda x, i=i: x[i], a) for i in range(n)])(value)


_REMAT_POLICIES = {
    None: None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Llama(nnx.Module):
    """The Llama 3.x decoder-only transformer.

    Args:
      config: the architecture.
      rngs: ``nnx.Rngs`` for initialisation (normal, std 0.02; norms 1).
      param_dtype: parameter dtype; default :func:`default_dtype` (float32 on CPU, bfloat16 on accelerators).
      dtype: compute (activation) dtype; default ``param_dtype``.
      attention_impl: see :func:`llama_jax.attention.attend` (None: cuDNN on GPU where it fits, else the
        blockwise XLA path; "reference": the dense einsum oracle).
      attention_block: key block of the blockwise attention (default: ``llama_jax.attention.attend``'s choice).
      remat: rematerialisation of each scanned decoder layer in the backward pass: None (store everything),
        "full" (recompute the whole layer), or "dots" (save matmul outputs, recompute the rest;
        ``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``).

    Call: ``model(tokens)`` -> float32 logits [B, T, V] for int32 tokens [B, T]; ``positions`` int32 [B, T]
    (default 0..T-1, or continuing from ``kv_cache.lengths``); ``segment_ids`` int32 [B, T] keeps packed
    documents apart; with ``kv_cache`` returns ``(logits, kv_cache)``.
    """

    def __init__(
        self,
        config: LlamaConfig,
        *,
        rngs: nnx.Rngs,
        param_dtype=None,
        dtype=None,
        attention_impl: str | None = None,
        remat: str | None = None,
        attention_block: int | None = None,
    ):
        if attention_impl not in (None,) + attention.IMPLEMENTATIONS:
            raise ValueError(
                f"attention_impl must be one of {attention.IMPLEMENTATIONS} or None, got {attention_impl!r}"
            )
        if attention_block is not None and attention_block < 1:
            raise ValueError(f"attention_block must be positive, got {attention_block}")
        if remat not in _REMAT_POLICIES:
            raise ValueError(f"remat must be one of {sorted(map(str, _REMAT_POLICIES))}, got {remat!r}")
        param_dtype = jnp.dtype(param_dtype or default_dtype())
        self.config = config
        self.param_dtype = param_dtype
        self.dtype = jnp.dtype(dtype or param_dtype)
        self.attention_impl = attention_impl
        self.attention_block = attention_block
        self.remat = remat
        self.embedder = Embedder(config.vocab_size, config.dim, param_dtype=param_dtype, rngs=rngs)
        self.layers = Block(config, param_dtype=param_dtype, rngs=rngs, layers=config.n_layers)
        self.final_norm = RMSNorm(config.dim, config.norm_eps, param_dtype=param_dtype)
        if not config.tie_word_embeddings:
            self.lm_head = _param(rngs, (config.dim, config.vocab_size), ("embed", "vocab"), param_dtype, 0.02)

    @property
    def is_stacked(self) -> bool:
        return isinstance(self.layers, Block)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        *,
        kv_cache: KVCache | None = None,
        segment_ids: jax.Array | None = None,
        return_hidden: bool = False,
    ):
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be int32 [B, T], got shape {tokens.shape}")
        b, t = tokens.shape
        if positions is None:
            start = kv_cache.lengths[:, None] if kv_cache is not None else 0
            positions = start + jnp.arange(t, dtype=jnp.int32)[None, :]
        positions = jnp.broadcast_to(positions, (b, t)).astype(jnp.int32)

        if kv_cache is not None and segment_ids is not None:
            raise ValueError("segment_ids (packed documents) apply to the uncached forward only, not with kv_cache")
        x = self.embedder.encode(tokens, self.dtype)  # [B, T, D]
        if isinstance(kv_cache, KVCache):  # a 16-bit float cache: the layers write and read its bit patterns
            # a bf16 cache on XLA:CPU: written and read in place by the CPU kernels, else through its uint16 view
            in_place = cpu_kernels.cache_in_place(kv_cache.k)
            x, kv_cache = self._apply_layers(x, positions, segment_ids, kv_cache if in_place else kv_cache.as_bits())
            kv_cache = kv_cache.as_floats()
        else:
            x, kv_cache = self._apply_layers(x, positions, segment_ids, kv_cache)
        x = self.final_norm(x)
        if return_hidden:
            return x if kv_cache is None else (x, kv_cache)
        logits = self.logits(x)
        return logits if kv_cache is None else (logits, kv_cache)

    def logits(self, x: jax.Array) -> jax.Array:
        """Final-normed hidden states [B, T, D] -> float32 logits [B, T, V]."""
        if self.config.tie_word_embeddings:
            return self.embedder.decode(x)
        return project(x, self.lm_head, "lm_head", jnp.float32)  # [B, T, V]

    def _apply_layers(self, x, positions, segment_ids, kv_cache):
        impl, blk = self.attention_impl, getattr(self, "attention_block", None)
        new_lengths = None if kv_cache is None else positions[:, -1] + 1
        if not self.is_stacked:  # unstacked: a Python loop over per-layer blocks
            for i, block in enumerate(self.layers):
                x, kv = block(x, positions, segment_ids, None if kv_cache is None else (kv_cache, i), impl, blk)
                kv_cache = None if kv is None else kv[0]
            if kv_cache is not None:
                kv_cache = kv_cache.replace(lengths=new_lengths)
            return x, kv_cache

        graphdef, state = nnx.split(self.layers)
        if kv_cache is None:

            def body(x, layer_state):
                x, _ = nnx.merge(graphdef, layer_state)(x, positions, segment_ids, None, impl, blk)
                return x, None

            if self.remat is not None:
                body = jax.checkpoint(body, policy=_REMAT_POLICIES[self.remat], prevent_cse=False)
            x, _ = jax.lax.scan(body, x, state)
            return x, None

        def body_cached(carry, layer_state):
            x, cache, i = carry
            x, (cache, _) = nnx.merge(graphdef, layer_state)(x, positions, None, (cache, i), impl, blk)
            return (x, cache, i + 1), None

        (x, kv_cache, _), _ = jax.lax.scan(body_cached, (x, kv_cache, jnp.int32(0)), state)
        return x, kv_cache.replace(lengths=new_lengths)

    # ------------------------------------------------------------------ layer layout
    def _matmul_params(self):
        """(name, Param) of every matmul weight whose layout :meth:`set_weight_layout` changes (not the table)."""
        for path, var in nnx.iter_graph(self):
            if isinstance(var, nnx.Param) and path and path[-1] in CONTRACTED_AXES and path[-1] != "embedding":
                yield path[-1], var

    @property
    def weight_layout(self) -> str:
        """ "in_out" (the checkpoint's, contracted axes first) or "out_in" (contracted axes last); see the module
        docstring."""
        name, var = next(self._matmul_params())
        axes = [a for a in var.get_metadata()["out_sharding"] if a != "layers"]
        return "in_out" if axes[0] in CONTRACTED_AXES[name] else "out_in"

    def set_weight_layout(self, layout: str) -> None:
        """Permutes every matmul weight (and int8 q/scale, llama_jax.quant) into ``layout``, in place.

        The logical axis names (``out_sharding`` metadata) are permuted with the values, so the sharding rules
        still place every axis; results are unchanged (same products, see :func:`project`). Weights are
        transposed one at a time and each old array is released as soon as it is replaced (when nothing else
        references it), so the extra memory is at most one weight. The embedding table [V, D] is already
        contracted on its last axis for the tied head and is left as it is.

        Raises ValueError for a layout not in :data:`WEIGHT_LAYOUTS`.
        """
        if layout not in WEIGHT_LAYOUTS:
            raise ValueError(f"weight layout must be one of {WEIGHT_LAYOUTS}, got {layout!r}")
        for name, var in list(self._matmul_params()):
            value = var.get_value()
            axes = tuple(var.get_metadata()["out_sharding"])
            perm = _layout_perm(axes, name, layout)
            if perm == tuple(range(len(axes))):
                continue
            var.set_value(None)  # drop our reference before the new copy lands
            var.set_value(_permute_value(value, perm))
            del value
            var.set_metadata("out_sharding", tuple(axes[i] for i in perm))

    @contextlib.contextmanager
    def checkpoint_form(self):
        """Within the block the model is in the checkpoint's form (stacked layers, "in_out" weights); on exit it
        returns to the form it had (in place both ways, one parameter at a time). Used by the savers."""
        unstacked, layout = not self.is_stacked, self.weight_layout
        self.stack_layers()
        self.set_weight_layout("in_out")
        try:
            yield self
        finally:
            self.set_weight_layout(layout)
            if unstacked:
                self.unstack_layers()

    def unstack_layers(self) -> None:
        """Replaces the stacked block with a list of per-layer blocks (each parameter sliced once).

        Parameter by parameter: the L slices of one stacked array are made and the stacked array is dropped
        before the next, so the stacked and unstacked forms of the model are never both held (peak: the model
        plus one stacked parameter).
        """
        if not self.is_stacked:
            return
        n = self.config.n_layers
        graphdef, state = nnx.split(self.layers)
        del self.layers
        flat = list(nnx.to_flat_state(state))
        del state
        per_layer = [[] for _ in range(n)]
        for k in range(len(flat)):
            # drop our reference to each stacked Variable as we go (never set it to None: a caller's nnx.State
            # may share it, as after nnx.merge(graphdef, state))
            (path, var), flat[k] = flat[k], None
            slices = _split_layers(var.get_value(), n)
            meta = var.get_metadata()
            axes = meta.get("out_sharding")
            for i in range(n):
                new = var.replace(slices[i])
                if axes:
                    new.set_metadata("out_sharding", tuple(axes[1:]))
                per_layer[i].append((path, new))
            del slices, var
        self.layers = nnx.List([nnx.merge(graphdef, nnx.from_flat_state(items)) for items in per_layer])

    def stack_layers(self) -> None:
        """Inverse of :meth:`unstack_layers` (parameter by parameter: the per-layer arrays of one parameter are
        released as its stacked array is made)."""
        if self.is_stacked:
            return
        graphdef = nnx.split(self.layers[0])[0]
        flats = [list(nnx.to_flat_state(nnx.split(b)[1])) for b in self.layers]
        del self.layers
        stacked = {}
        for j, (path, var) in enumerate(flats[0]):
            values = [flat[j][1].get_value() for flat in flats]
            for flat in flats:  # drop our references (a caller's state may share the Variables: never None them)
                flat[j] = None
            new = var.replace(jax.tree.map(lambda *a: jnp.stack(a), *values))
            del values
            axes = var.get_metadata().get("out_sharding")
            if axes:
                new.set_metadata("out_sharding", ("layers",) + tuple(axes))
            stacked[path] = new
        self.layers = nnx.merge(graphdef, nnx.from_flat_state(stacked))

    def num_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(nnx.state(self, nnx.Param)))
