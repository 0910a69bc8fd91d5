"""Issue 15: blockwise attention (llama_jax.attention.attend) equals the einsum oracle; int8 KV cache; long context."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax import attention
from llama_jax.attention import attend, choose_implementation, cudnn_attention, dense_mask, reference_attention
from llama_jax.engine import Engine
from llama_jax.kv_cache import init_cache, quantize_kv
from llama_jax.model import Llama
from tests.reference import LLAMA31_SCALING, randomize, tiny_config

# float32 attention over <= a few thousand keys: outputs are convex combinations of O(1) values, so the blockwise
# and dense orders of summation differ by a few float32 ulps (~1e-7) times log2(S); 2e-5 absolute leaves margin.
ATOL = 2e-5
N, K, H = 8, 2, 16


def _qkv(b, t, s, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, N, H)).astype(np.float32)
    k = rng.standard_normal((b, s, K, H)).astype(np.float32)
    v = rng.standard_normal((b, s, K, H)).astype(np.float32)
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


def _cached_oracle(q, k, v, positions):
    return reference_attention(q, k, v, dense_mask(positions, k.shape[1], cached=True))


def test_ragged_decode_one_row_20x_longer():
    """Decode (T=1): row 0 at position 12, row 1 at position 250 (20x); slots past 250 hold NaN, so a block past
    the longest row that were read (even masked) would poison the result: they are skipped."""
    s, block = 512, 16
    q, k, v = _qkv(2, 1, s)
    positions = jnp.asarray([[12], [250]], jnp.int32)
    needed = (250 // block + 1) * block  # slots of the blocks that must be read
    k_nan = k.at[:, needed:].set(jnp.nan)
    v_nan = v.at[:, needed:].set(jnp.nan)
    out = attend(q, k_nan, v_nan, positions, cached=True, block_size=block)
    np.testing.assert_allclose(np.asarray(out), np.asarray(_cached_oracle(q, k, v, positions)), atol=ATOL)


@pytest.mark.parametrize("last", [63, 64, 511])  # prompt ends on a block edge / one past it / last slot
def test_prefill_chunk_block_edges_and_full_cache(last):
    s, block, t = 512, 32, 16
    q, k, v = _qkv(2, t, s, seed=last)
    positions = (last - t + 1 + jnp.arange(t, dtype=jnp.int32))[None].repeat(2, 0)
    positions = positions.at[1].add(-5)  # a second, shorter row
    out = attend(q, k, v, positions, cached=True, block_size=block)
    np.testing.assert_allclose(np.asarray(out), np.asarray(_cached_oracle(q, k, v, positions)), atol=ATOL)


def test_cache_length_not_a_multiple_of_the_block():
    """S = 100, block 32: the short last block is read as the last 32 slots, its overlap masked."""
    q, k, v = _qkv(1, 4, 100)
    positions = jnp.asarray([[40, 70, 98, 99]], jnp.int32)
    out = attend(q, k, v, positions, cached=True, block_size=32)
    np.testing.assert_allclose(np.asarray(out), np.asarray(_cached_oracle(q, k, v, positions)), atol=ATOL)


def test_stacked_cache_reads_one_layer():
    q, k, v = _qkv(2, 3, 64)
    k_all = jnp.stack([k * 3.0, k, -k])  # [L, B, S, K, H]
    v_all = jnp.stack([v + 1.0, v, -v])
    positions = jnp.asarray([[5, 6, 7], [40, 41, 42]], jnp.int32)
    out = attend(q, k_all, v_all, positions, cached=True, layer=jnp.int32(1), block_size=16)
    np.testing.assert_allclose(np.asarray(out), np.asarray(_cached_oracle(q, k, v, positions)), atol=ATOL)


def test_self_attention_packed_segments_values_and_gradients():
    """Training forward (T = S = 100, blocks of 16: 7 query blocks with their causal key blocks, padding) with
    two packed documents per row: values and gradients equal the dense oracle."""
    t = 100
    q, k, v = _qkv(2, t, t, seed=3)
    seg = np.ones((2, t), np.int32)
    seg[0, 37:] = 2
    seg[1, 80:] = 0  # padding
    pos = np.broadcast_to(np.arange(t), (2, t)).copy()
    pos[0, 37:] -= 37
    seg, pos = jnp.asarray(seg), jnp.asarray(pos, jnp.int32)
    mask = dense_mask(pos, t, cached=False, segment_ids=seg)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((2, t, N, H)), jnp.float32)

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v) * w)

    ours = lambda q, k, v: attend(q, k, v, pos, cached=False, segment_ids=seg, block_size=16)  # noqa: E731
    ref = lambda q, k, v: reference_attention(q, k, v, mask)  # noqa: E731
    np.testing.assert_allclose(np.asarray(ours(q, k, v)), np.asarray(ref(q, k, v)), atol=ATOL)
    g_ours = jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2))(q, k, v)
    g_ref = jax.grad(lambda *a: loss(ref, *a), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_ours, g_ref, strict=True):
        # gradients sum O(T) terms of O(|w|) size: a ulp-level relative error of their scale
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4 * float(jnp.max(jnp.abs(b))))


def test_self_attention_skips_causal_blocks():
    """Query block i visits key blocks j <= i only: the blocks j > i sit behind a lax.cond, not a mask."""
    q, k, v = _qkv(1, 64, 64)
    pos = jnp.arange(64, dtype=jnp.int32)[None]
    jaxpr = jax.make_jaxpr(lambda q, k, v: attend(q, k, v, pos, cached=False, block_size=16))(q, k, v)
    assert "cond" in str(jaxpr)


def test_int8_cache_attention_equals_oracle_on_dequantized_values():
    q, k, v = _qkv(2, 5, 128, seed=7)
    (kq, ks), (vq, vs) = quantize_kv(k), quantize_kv(v)
    assert kq.dtype == jnp.int8 and ks.shape == (2, 128, K)
    # absmax / 127 rounding: each element within half a quantization step
    assert float(jnp.max(jnp.abs(kq * ks[..., None] - k) - 0.5 * ks[..., None])) <= 1e-6
    positions = jnp.asarray([[3, 4, 5, 6, 7], [100, 101, 102, 103, 104]], jnp.int32)
    out = attend(q, kq, vq, positions, cached=True, k_scale=ks, v_scale=vs, block_size=32)
    ref = _cached_oracle(q, kq * ks[..., None], vq * vs[..., None], positions)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=ATOL)


def _cached_case(t, s, firsts, int8, seed):
    """Queries of T tokens per row starting at ``firsts`` [B, 1] against an S-slot cache (float or int8 with its
    scales), and the oracle's output: (q, k, v, positions [B, T], scales kwargs, ref)."""
    q, k, v = _qkv(len(firsts), t, s, seed=seed)
    positions = jnp.asarray(firsts, jnp.int32) + jnp.arange(t, dtype=jnp.int32)[None]  # [B, T]
    if not int8:
        return q, k, v, positions, {}, _cached_oracle(q, k, v, positions)
    (k, ks), (v, vs) = quantize_kv(k), quantize_kv(v)
    ref = _cached_oracle(q, k * ks[..., None], v * vs[..., None], positions)
    return q, k, v, positions, dict(k_scale=ks, v_scale=vs), ref


@pytest.mark.parametrize("stored_order", [True, False])
@pytest.mark.parametrize("int8", [False, True])
def test_decode_block_update_in_stored_and_transposed_order(monkeypatch, stored_order, int8):
    """Decode-sized chunks (T 1 and 3, ragged rows) read cache blocks in their stored [B, C, K, H] order through
    block-diagonal queries, or transposed to [B, K, C, H]: both equal the oracle, float and int8 caches."""
    monkeypatch.setattr(attention, "STORED_ORDER_MAX", 10**9 if stored_order else 0)
    for t in (1, 3):
        # row 2 ends on the last slot
        q, k, v, positions, scales, ref = _cached_case(t, 96, [[5], [40], [96 - t]], int8, seed=11 + t)
        out = attend(q, k, v, positions, cached=True, block_size=32, **scales)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=ATOL)


@pytest.mark.parametrize("int8", [False, True], ids=["float", "int8"])
def test_decode_tail_blocks_read_past_whole_blocks(monkeypatch, int8):
    """Decode-sized chunks read whole DECODE_BLOCK blocks, then the slots up to the longest row in
    DECODE_TAIL_BLOCK blocks (a cache length no block size divides; rows ragged by 20x, one on a block edge, one
    ending on the last slot, one whose tail is empty): all equal the oracle, and with a stacked cache too."""
    monkeypatch.setattr(attention, "DECODE_BLOCK", 64)
    monkeypatch.setattr(attention, "DECODE_TAIL_BLOCK", 24)
    s = 203
    for t, firsts in ((1, [[9], [63], [64], [202], [127]]), (3, [[9], [61], [190], [200], [125]])):
        q, k, v, positions, scales, ref = _cached_case(t, s, firsts, int8, seed=21 + t)
        for rows in ([0, 1, 2, 3, 4], [0], [2], [3], [4]):  # together, and alone (single-row decode)
            r = jnp.asarray(rows)
            sub = {name: x[r] for name, x in scales.items()}
            out = attend(q[r], k[r], v[r], positions[r], cached=True, implementation="blockwise", **sub)
            np.testing.assert_allclose(np.asarray(out), np.asarray(ref[r]), atol=ATOL)
        stacked = {name: jnp.stack([x, x]) for name, x in scales.items()}
        out = attend(
            q,
            jnp.stack([k, k]),
            jnp.stack([v, v]),
            positions,
            cached=True,
            layer=1,
            implementation="blockwise",
            **stacked,
        )
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=ATOL)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(implementation="flash"), "implementation"),
        (dict(cached=True, segment_ids=jnp.zeros((1, 4), jnp.int32)), "segment_ids"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    q, k, v = _qkv(1, 4, 4)
    args = dict(cached=False) | kwargs
    with pytest.raises(ValueError, match=match):
        attend(q, k, v, jnp.arange(4, dtype=jnp.int32)[None], **args)
    with pytest.raises(ValueError, match="attention_impl"):
        Llama(tiny_config(), rngs=nnx.Rngs(0), attention_impl="flash")


def _packed(b, t, cuts):
    """Segment ids and positions restarting at each cut (packed documents), per row."""
    seg = np.zeros((b, t), np.int32)
    pos = np.zeros((b, t), np.int32)
    for r, row_cuts in enumerate(cuts):
        edges = [0, *row_cuts, t]
        for i, (a, z) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
            seg[r, a:z], pos[r, a:z] = i, np.arange(z - a)
    return jnp.asarray(seg), jnp.asarray(pos)


# the splash kernel takes q pre-scaled by H**-0.5 (one more float32 rounding of q) and sums its tiles in its own
# order: a few float32 ulps of O(1) outputs, as the blockwise path; ATOL covers it.
@pytest.mark.parametrize("case", ["causal", "packed", "positions_not_by_index"])
def test_splash_kernel_in_interpret_mode_equals_oracle(case):
    """The Pallas TPU splash attention kernel, run on CPU in Pallas's interpret mode through attend: GQA (8 query
    heads on 2 KV heads, not repeated), causal, packed segments; positions that do not follow the index take the
    blockwise branch of the same lax.cond and still match."""
    t = 256
    q, k, v = _qkv(2, t, t, seed=11)
    seg = None
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (2, t))
    if case == "packed":
        seg, pos = _packed(2, t, [[100], [128, 192]])
    elif case == "positions_not_by_index":
        pos = pos.at[1].set(jnp.arange(t, dtype=jnp.int32)[::-1])  # a row whose positions fall: causal by index
    out = attend(q, k, v, pos, cached=False, segment_ids=seg, implementation="splash", block_size=128)
    ref = reference_attention(q, k, v, dense_mask(pos, t, cached=False, segment_ids=seg))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=ATOL)


def test_splash_kernel_gradients_in_interpret_mode():
    """Training through the splash kernel's own backward kernels (dq, dkv) equals the oracle's gradients."""
    t = 128
    q, k, v = _qkv(1, t, t, seed=12)
    seg, pos = _packed(1, t, [[50]])
    mask = dense_mask(pos, t, cached=False, segment_ids=seg)
    w = jnp.asarray(np.random.default_rng(2).standard_normal((1, t, N, H)), jnp.float32)
    ours = lambda q, k, v: jnp.sum(attend(q, k, v, pos, cached=False, segment_ids=seg, implementation="splash") * w)  # noqa: E731
    ref = lambda q, k, v: jnp.sum(reference_attention(q, k, v, mask) * w)  # noqa: E731
    for a, b in zip(jax.grad(ours, (0, 1, 2))(q, k, v), jax.grad(ref, (0, 1, 2))(q, k, v), strict=True):
        # gradients sum O(T) terms of O(|w|) size: a ulp-level relative error of their scale
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4 * float(jnp.max(jnp.abs(b))))


def test_cudnn_arguments_equal_oracle_through_xla(monkeypatch):
    """The arguments the cuDNN path hands jax.nn.dot_product_attention (per-row key lengths for decode, cuDNN's
    causal mask for a prefill from position 0, the blockwise fallback for a later chunk, a dense mask for packed
    rows) give the oracle's result; JAX's XLA implementation of the same call stands in for cuDNN on CPU."""
    s, layers = 300, 3
    rng = np.random.default_rng(13)
    kc, vc = (jnp.asarray(rng.standard_normal((layers, 2, s, K, H)), jnp.float32) for _ in range(2))
    q, _, _ = _qkv(2, 64, 1, seed=13)
    cases = {
        "decode, ragged rows": jnp.asarray([[4], [280]], jnp.int32),
        "prefill from 0": jnp.broadcast_to(jnp.arange(64, dtype=jnp.int32), (2, 64)),
        "later chunk": 100 + jnp.broadcast_to(jnp.arange(64, dtype=jnp.int32), (2, 64)),
    }
    for split in (4096, 16):  # the fallback of a long later chunk runs in query sub-chunks (here 4 of 16)
        monkeypatch.setattr(attention, "FALLBACK_QUERY_BLOCK", split)
        for name, pos in cases.items():
            qq = q[:, : pos.shape[1]]
            out = cudnn_attention(qq, kc, vc, pos, cached=True, layer=2, block=64, implementation="xla")
            ref = reference_attention(qq, kc[2], vc[2], dense_mask(pos, s, cached=True))
            np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=ATOL, err_msg=f"{name}, split {split}")
    q, k, v = _qkv(2, 64, 64, seed=14)
    for seg, pos in [(None, jnp.broadcast_to(jnp.arange(64, dtype=jnp.int32), (2, 64))), _packed(2, 64, [[20], [9]])]:
        out = cudnn_attention(q, k, v, pos, cached=False, segment_ids=seg, implementation="xla")
        ref = reference_attention(q, k, v, dense_mask(pos, 64, cached=False, segment_ids=seg))
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=ATOL)


def test_backend_selection_rule():
    bf, f32, i8 = jnp.bfloat16, jnp.float32, jnp.int8
    assert choose_implementation(bf, bf, backend="gpu") == "cudnn"
    assert choose_implementation(bf, bf, head_dim=128, cached=True, length=1, backend="gpu") == "cudnn"
    assert choose_implementation(bf, bf, head_dim=256, backend="gpu") == "blockwise"  # beyond cuDNN's head dims
    assert choose_implementation(bf, i8, backend="gpu") == "blockwise"  # int8 cache
    assert choose_implementation(f32, f32, backend="gpu") == "blockwise"
    assert choose_implementation(bf, bf, head_dim=128, cached=False, length=8192, backend="tpu") == "splash"
    assert choose_implementation(bf, bf, head_dim=128, cached=False, length=8000, backend="tpu") == "blockwise"
    assert choose_implementation(bf, bf, head_dim=64, cached=False, length=8192, backend="tpu") == "blockwise"
    assert choose_implementation(bf, bf, head_dim=128, cached=True, length=8192, backend="tpu") == "blockwise"
    assert choose_implementation(f32, f32, head_dim=128, cached=False, length=8192, backend="cpu") == "blockwise"
    q, k, v = _qkv(1, 100, 100)
    with pytest.raises(ValueError, match="multiple of 128"):
        attend(q, k, v, jnp.arange(100, dtype=jnp.int32)[None], cached=False, implementation="splash")
    with pytest.raises(ValueError, match="self-attention"):
        attend(q, k, v, jnp.asarray([[5]], jnp.int32)[:, :1], cached=True, implementation="splash")


def test_long_context_sampled_queries_against_naive():
    """16384 keys, prefill in 512-token chunks as the engine does (cache of 16384 slots, blocks of 512): sampled
    query rows equal naive attention over their prefixes (a few naive rows are cheap)."""
    s, chunk = 16384, 512
    rng = np.random.default_rng(0)
    k = jnp.asarray(rng.standard_normal((1, s, K, H)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((1, s, K, H)), jnp.float32)
    q_all = rng.standard_normal((1, s, N, H)).astype(np.float32)
    run = jax.jit(lambda q, pos: attend(q, k, v, pos, cached=True))
    sample = [0, 511, 512, 8191, 12000, 16383]
    got = {}
    for start in sorted({p // chunk * chunk for p in sample}):
        pos = jnp.arange(start, start + chunk, dtype=jnp.int32)[None]
        out = np.asarray(run(jnp.asarray(q_all[:, start : start + chunk]), pos))
        for p in sample:
            if start <= p < start + chunk:
                got[p] = out[0, p - start]
    kn, vn = np.asarray(k, np.float64)[0], np.asarray(v, np.float64)[0]
    for p in sample:
        qg = q_all[0, p].astype(np.float64).reshape(K, N // K, H)
        scores = np.einsum("KGH,SKH->KGS", qg, kn[: p + 1]) / np.sqrt(H)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        naive = np.einsum("KGS,SKH->KGH", probs, vn[: p + 1]).reshape(N, H)
        np.testing.assert_allclose(got[p], naive, atol=ATOL, err_msg=f"query position {p}")


# ------------------------------------------------------------------------------------------- model and engine
CONFIG = tiny_config(max_seq_len=4096, rope_scaling=LLAMA31_SCALING, rope_theta=500000.0)


def _model(impl=None, block=None, seed=0):
    return randomize(Llama(CONFIG, rngs=nnx.Rngs(seed), attention_impl=impl, attention_block=block), seed, std=0.2)


def _tol(ref):
    # logits of a 2-layer float32 model: relative float32 rounding of the largest logit, with margin
    return 1e-5 * max(1.0, float(np.max(np.abs(ref))))


@pytest.mark.parametrize("unstack", [False, True])
def test_model_logits_equal_oracle_uncached_and_cached(unstack):
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (2, 70)))
    ours, ref = _model(block=16), _model("reference")
    if unstack:
        ours.unstack_layers()
    full = np.asarray(ref(tokens))
    np.testing.assert_allclose(np.asarray(ours(tokens)), full, atol=_tol(full))
    # cached: 33-token prefill (one past a block edge), then decode steps, cache of 40 slots filled to the last
    cache = init_cache(CONFIG, 2, 40)
    logits, cache = ours(tokens[:, :33], kv_cache=cache)
    np.testing.assert_allclose(np.asarray(logits), full[:, :33], atol=_tol(full))
    for t in range(33, 40):
        logits, cache = ours(tokens[:, t : t + 1], kv_cache=cache)
        np.testing.assert_allclose(np.asarray(logits[:, 0]), full[:, t], atol=_tol(full))
    assert int(cache.lengths[0]) == 40


def test_engine_ragged_batch_equals_oracle_engine():
    """Prompts of 30 and 600 tokens (20x) through chunked prefill + decode; blockwise (blocks of 64) vs the
    dense oracle: identical greedy tokens, log-probabilities within float32 rounding."""
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, CONFIG.vocab_size, n).tolist() for n in (30, 600)]
    ours = Engine(_model(block=64), chunk_size=128).generate(prompts, max_new_tokens=6)
    ref = Engine(_model("reference"), chunk_size=128).generate(prompts, max_new_tokens=6)
    for a, b in zip(ours, ref, strict=True):
        assert a.tokens == b.tokens
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)  # log-softmax of O(10) logits, float32


def test_engine_int8_cache_quarter_bytes_and_close_to_float():
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, CONFIG.vocab_size, n).tolist() for n in (9, 40)]
    f32 = Engine(_model(block=16), chunk_size=16)
    i8 = Engine(_model(block=16), chunk_size=16, kv_dtype="int8")
    c32, c8 = f32.new_cache(2, 64), i8.new_cache(2, 64)
    assert c8.k.dtype == jnp.int8 and c8.quantized
    # int8 K/V + one float32 scale per token per KV head: (H + 4) / (4 H) of the float32 bytes
    kv_bytes = lambda c: c.nbytes() - c.lengths.nbytes  # noqa: E731
    assert kv_bytes(c8) / kv_bytes(c32) == pytest.approx((CONFIG.head_dim + 4) / (4 * CONFIG.head_dim))
    _, l32 = f32.prefill(prompts, c32)
    _, l8 = i8.prefill(prompts, c8)
    p32, p8 = jax.nn.softmax(l32), jax.nn.softmax(l8)
    assert float(jnp.max(jnp.abs(p32 - p8))) < 0.02  # int8 K/V: ~0.4% relative error per value
    with pytest.raises(ValueError, match="kv_dtype"):
        Engine(_model(), kv_dtype="int4")


# ------------------------------------------------------------------------------------------- real weights
@pytest.fixture(scope="module")
def smollm2(smollm2_checkpoint):
    from llama_jax import checkpoint

    return checkpoint.load(smollm2_checkpoint)


def _nll(model, ids, kv_dtype):
    cache = init_cache(model.config, 1, len(ids), model.dtype, kv_dtype=kv_dtype)
    step = jax.jit(lambda m, t, c: m(t, kv_cache=c))
    logits = []
    for start in range(0, len(ids) - 1, 128):
        chunk = jnp.asarray([ids[start : min(start + 128, len(ids) - 1)]])
        out, cache = step(model, chunk, cache)
        logits.append(out[0])
    logp = jax.nn.log_softmax(jnp.concatenate(logits), axis=-1)
    return -float(jnp.mean(logp[jnp.arange(len(ids) - 1), jnp.asarray(ids[1:])]))


def test_smollm2_int8_cache_perplexity_within_1_percent(smollm2, smollm2_checkpoint):
    from llama_jax import checkpoint
    from llama_jax.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(checkpoint.tokenizer_dir(smollm2_checkpoint))
    with open(os.path.join(os.path.dirname(__file__), "data", "eval_text.txt"), encoding="utf-8") as f:
        ids = tokenizer.encode(f.read())[:1024]
    ppl32, ppl8 = np.exp(_nll(smollm2, ids, None)), np.exp(_nll(smollm2, ids, "int8"))
    print(f"SmolLM2 perplexity over {len(ids)} tokens: float32 cache {ppl32:.4f}, int8 cache {ppl8:.4f}")
    assert abs(ppl8 / ppl32 - 1) < 0.01


def test_smollm2_int8_cache_greedy_equals_float(smollm2, smollm2_checkpoint):
    from llama_jax import checkpoint
    from llama_jax.chat import chat_format_for
    from llama_jax.tokenizer import Tokenizer
    from tests.test_generate import CHAT_PROMPTS, _top2_gap

    tokenizer = Tokenizer.from_file(checkpoint.tokenizer_dir(smollm2_checkpoint))
    fmt = chat_format_for(tokenizer)
    prompts = [fmt.encode_dialog_prompt([{"role": "user", "content": p}]) for p in CHAT_PROMPTS]
    engine = Engine(smollm2)
    ref = engine.generate(prompts, max_new_tokens=48)
    i8 = Engine(smollm2, kv_dtype="int8").generate(prompts, max_new_tokens=48)
    for prompt, a, b in zip(prompts, i8, ref, strict=True):
        if a.tokens == b.tokens:
            continue
        step = next(i for i, (x, y) in enumerate(zip(a.tokens, b.tokens, strict=True)) if x != y)
        logits = np.asarray(engine.model(jnp.asarray([prompt + b.tokens[:step]]))[0, -1])
        gap = _top2_gap(logits)
        print(f"int8 cache diverged at step {step}: float top-2 gap {gap:.4f}")
        assert gap < 0.05, f"diverged at step {step} without a near tie (float top-2 logit gap {gap})"


# ------------------------------------------------------------------------------------------- planner
def test_planned_prefill_temporaries_do_not_grow_with_the_cache():
    """The planner compiles the blockwise path: prefill temporaries at 32768 slots are those at 4096 (the dense
    einsum form's grow with chunk x S, checked too so the comparison can fail)."""
    from llama_jax import plan, sharding

    config = tiny_config(dim=128, n_heads=4, n_kv_heads=2, vocab_size=512, max_seq_len=32768)
    mesh = sharding.make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])

    def prefill_temp(s, impl=None):
        progs = plan.plan(
            config, mesh, "float32", max_length=s, prefill_length=512, log=lambda *_: None, attention_impl=impl
        )
        return progs[0].temp

    small, large = prefill_temp(4096), prefill_temp(32768)
    assert large <= 1.25 * small, (small, large)
    dense_small, dense_large = prefill_temp(4096, "reference"), prefill_temp(32768, "reference")
    assert dense_large > 4 * dense_small and dense_large > 4 * large, (dense_small, dense_large, large)


def test_int8_cache_continuous_batching_equals_each_alone():
    """Insert and grow carry the int8 scales: refilled rows give the tokens of each prompt generated alone."""
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, CONFIG.vocab_size, n).tolist() for n in (5, 30, 12)]
    engine = Engine(_model(block=16), chunk_size=16, kv_dtype="int8")
    got = dict(engine.generate_continuous(prompts, batch_size=2, max_new_tokens=5))
    for i, p in enumerate(prompts):
        (alone,) = engine.generate([p], max_new_tokens=5)
        assert got[i].tokens == alone.tokens, i
