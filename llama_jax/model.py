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

Decoder layers are stacked on a leading ``layers`` axis and applied with ``jax.lax.scan``, so compile time does
not grow with depth. :meth:`Llama.unstack_layers` turns them into a list of per-layer blocks (a Python loop in the
compiled program), which XLA:CPU decodes about twice as fast; :meth:`Llama.stack_layers` undoes it.

Einsum letters: B batch, T query length, S key length, D model dim, N query heads, K KV heads, G = N/K,
H head dim, F MLP hidden, V vocab, L layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llama_jax import attention
from llama_jax.config import LlamaConfig
from llama_jax.kv_cache import KVCache
from llama_jax.rope import apply_rope


def default_dtype() -> jnp.dtype:
    """float32 on CPU (XLA:CPU bf16 matrix-vector products are ~20x slower), bfloat16 on accelerators."""
    return jnp.dtype(jnp.float32) if jax.default_backend() == "cpu" else jnp.dtype(jnp.bfloat16)


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
        if hasattr(table, "q") and hasattr(table, "scale"):           # llama_jax.quant.QArray, per-row scales
            rows = jnp.take(table.q, tokens, axis=0).astype(dtype)
            return rows * jnp.take(table.scale, tokens, axis=0).astype(dtype)
        return jnp.take(self.embedding[...], tokens, axis=0).astype(dtype)

    def decode(self, x: jax.Array) -> jax.Array:
        """[B, T, D] -> float32 logits [B, T, V] (tied output head)."""
        table = self.embedding.get_value()
        if hasattr(table, "q") and hasattr(table, "scale"):           # int8: scale the logits per row (token)
            logits = jnp.einsum("BTD,VD->BTV", x, table.q.astype(x.dtype), preferred_element_type=jnp.float32)
            return logits * table.scale[:, 0].astype(jnp.float32)
        return jnp.einsum("BTD,VD->BTV", x, self.embedding[...].astype(x.dtype),
                          preferred_element_type=jnp.float32)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                          implementation: str | None = None) -> jax.Array:
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
        :class:`llama_jax.kv_cache.KVCache` and this layer's index: the new keys/values are written into slots
        ``positions`` of that layer (in place when the buffers are donated), then the queries attend to slots
        <= their positions (:func:`llama_jax.attention.attend`, which reads only the blocks it needs).
        Returns (out [B, T, D], kv').
        """
        dtype = x.dtype
        q = jnp.einsum("BTD,DNH->BTNH", x, self.q_proj[...].astype(dtype))             # [B, T, N, H]
        k = jnp.einsum("BTD,DKH->BTKH", x, self.k_proj[...].astype(dtype))             # [B, T, K, H]
        v = jnp.einsum("BTD,DKH->BTKH", x, self.v_proj[...].astype(dtype))             # [B, T, K, H]
        q = apply_rope(q, positions, self.config)
        k = apply_rope(k, positions, self.config)
        block = attention_block
        if kv is None:
            out = attention.attend(q, k, v, positions, cached=False, segment_ids=segment_ids,
                                   implementation=attention_impl, block_size=block)
        else:
            cache, layer = kv
            cache = cache.write(layer, positions, k, v)                                    # [L, B, S, K, H]
            kv = (cache, layer)
            out = attention.attend(q, cache.k, cache.v, positions, cached=True, k_scale=cache.k_scale,
                                   v_scale=cache.v_scale, layer=layer, implementation=attention_impl,
                                   block_size=block)
        return jnp.einsum("BTNH,NHD->BTD", out, self.o_proj[...].astype(dtype)), kv


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)) (reference ``FeedForward``: w2(silu(w1 x) * w3 x))."""

    def __init__(self, config: LlamaConfig, *, param_dtype, rngs: nnx.Rngs, layers: int | None = None):
        lead, lax = ((), ()) if layers is None else ((layers,), ("layers",))
        d, f = config.dim, config.hidden_dim
        self.gate_proj = _param(rngs, lead + (d, f), lax + ("embed", "mlp"), param_dtype, 0.02)
        self.up_proj = _param(rngs, lead + (d, f), lax + ("embed", "mlp"), param_dtype, 0.02)
        self.down_proj = _param(rngs, lead + (f, d), lax + ("mlp", "embed"), param_dtype, 0.02)

    def __call__(self, x):
        dtype = x.dtype
        gate = jnp.einsum("BTD,DF->BTF", x, self.gate_proj[...].astype(dtype))
        up = jnp.einsum("BTD,DF->BTF", x, self.up_proj[...].astype(dtype))
        return jnp.einsum("BTF,FD->BTD", jax.nn.silu(gate) * up, self.down_proj[...].astype(dtype))


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


def attention_mask(q_positions: jax.Array, k_positions: jax.Array,
                   q_segments: jax.Array | None = None, k_segments: jax.Array | None = None) -> jax.Array:
    """Causal mask by position: bool [B, T, S], True where k_position <= q_position (and segments agree).

    The model no longer builds masks (:func:`llama_jax.attention.attend` masks inside its blocks); kept for
    callers and tests."""
    mask = k_positions[:, None, :] <= q_positions[:, :, None]
    if q_segments is not None:
        mask &= q_segments[:, :, None] == k_segments[:, None, :]
    return mask


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

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, param_dtype=None, dtype=None,
                 attention_impl: str | None = None, remat: str | None = None, attention_block: int | None = None):
        if attention_impl not in (None,) + attention.IMPLEMENTATIONS:
            raise ValueError(f"attention_impl must be one of {attention.IMPLEMENTATIONS} or None, "
                             f"got {attention_impl!r}")
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

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, *,
                 kv_cache: KVCache | None = None, segment_ids: jax.Array | None = None,
                 return_hidden: bool = False):
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be int32 [B, T], got shape {tokens.shape}")
        b, t = tokens.shape
        if positions is None:
            start = kv_cache.lengths[:, None] if kv_cache is not None else 0
            positions = start + jnp.arange(t, dtype=jnp.int32)[None, :]
        positions = jnp.broadcast_to(positions, (b, t)).astype(jnp.int32)

        if kv_cache is not None and segment_ids is not None:
            raise ValueError("segment_ids (packed documents) apply to the uncached forward only, not with kv_cache")
        x = self.embedder.encode(tokens, self.dtype)                                   # [B, T, D]
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
        return jnp.einsum("BTD,DV->BTV", x, self.lm_head[...].astype(x.dtype), preferred_element_type=jnp.float32)

    def _apply_layers(self, x, positions, segment_ids, kv_cache):
        impl, blk = self.attention_impl, getattr(self, "attention_block", None)
        new_lengths = None if kv_cache is None else positions[:, -1] + 1
        if not self.is_stacked:                       # unstacked: a Python loop over per-layer blocks
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
    def unstack_layers(self) -> None:
        """Replaces the stacked block with a list of per-layer blocks (each parameter sliced once)."""
        if not self.is_stacked:
            return
        graphdef, state = nnx.split(self.layers)
        blocks = []
        for i in range(self.config.n_layers):
            layer_state = jax.tree.map(lambda a: a[i], state)
            block = nnx.merge(graphdef, layer_state)
            for _, var in nnx.iter_graph(block):
                if isinstance(var, nnx.Variable) and var.get_metadata().get("out_sharding"):
                    var.set_metadata("out_sharding", tuple(var.get_metadata()["out_sharding"][1:]))
            blocks.append(block)
        self.layers = nnx.List(blocks)

    def stack_layers(self) -> None:
        """Inverse of :meth:`unstack_layers`."""
        if self.is_stacked:
            return
        states = [nnx.split(b)[1] for b in self.layers]
        graphdef = nnx.split(self.layers[0])[0]
        stacked = jax.tree.map(lambda *a: jnp.stack(a), *states)
        block = nnx.merge(graphdef, stacked)
        for _, var in nnx.iter_graph(block):
            if isinstance(var, nnx.Variable) and var.get_metadata().get("out_sharding"):
                var.set_metadata("out_sharding", ("layers",) + tuple(var.get_metadata()["out_sharding"]))
        self.layers = block

    def num_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(nnx.state(self, nnx.Param)))
