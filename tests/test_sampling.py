"""Issue 3 item 3: sampling (greedy, temperature, top-k, top-p, min-p); cases of shared/cases/sampling.md.

Compilation dominates the run time on CPU, so the tests go through one jitted function with per-row
array parameters and reuse three shapes: (3, 17), (4000, 17), (2, 50000).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama_jax import sampling
from llama_jax.sampling import filter_logits, greedy, log_probs, sample, validate_sampling


@jax.jit
def _filter_and_sample_jit(logits, key, t, k, p, m):
    f = filter_logits(logits, temperature=t, top_k=k, top_p=p, min_p=m)
    s = sample(logits, key, temperature=t, top_k=k, top_p=p, min_p=m)
    return f, s


def _run(logits, seed=0, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, key=None):
    """(filtered logits, sampled tokens) as NumPy, every parameter broadcast to a [B] array."""
    logits = jnp.asarray(logits, jnp.float32)
    b = logits.shape[0]
    f, s = _filter_and_sample_jit(
        logits,
        jax.random.key(seed) if key is None else key,
        jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (b,)),
        jnp.broadcast_to(jnp.asarray(top_k, jnp.int32), (b,)),
        jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), (b,)),
        jnp.broadcast_to(jnp.asarray(min_p, jnp.float32), (b,)),
    )
    assert s.dtype == jnp.int32 and s.shape == (b,) and f.dtype == jnp.float32 and f.shape == logits.shape
    return np.asarray(f), np.asarray(s)


def _kept(filtered):
    """Set of token ids per row that can still be drawn."""
    return [set(np.flatnonzero(np.isfinite(row)).tolist()) for row in np.asarray(filtered)]


_B, _V = 3, 17  # the shape of most tests; one more compilation per other shape


def _padded_log(probs, rows):
    """[rows, _V] logits: log of `probs`, then zero-probability (-inf) tokens up to _V."""
    p = np.zeros(_V)
    p[: len(probs)] = probs
    with np.errstate(divide="ignore"):
        return np.tile(np.log(p).astype(np.float32), (rows, 1))


def _draws(probs, seed=0, **kw):
    """Tokens drawn from 4000 copies of one distribution (rows draw independently)."""
    return _run(_padded_log(probs, 4000), seed, **kw)[1]


# ---------------------------------------------------------------- cases of shared/cases/sampling.md

# (probabilities, top_p, tokens that may be drawn)
NUCLEUS_CASES = [
    ([0.3, 0.1, 0.1, 0.5], 0.8, {3, 0}),  # 0.5 + 0.3 reaches 0.8 exactly
    ([0.4, 0.3, 0.2, 0.1], 0.8, {0, 1, 2}),  # 0.4 + 0.3 = 0.7 is not enough
]


@pytest.mark.parametrize("shift", [0.0, 7.3, -40.0])  # logits are log-probs up to a constant
@pytest.mark.parametrize("probs,top_p,expected", NUCLEUS_CASES)
def test_nucleus_cases_mask(probs, top_p, expected, shift):
    logits = _padded_log(probs, _B) + shift
    # per-row parameters: the case next to top_p = 1
    f, _ = _run(logits, top_p=[top_p, 1.0, top_p])
    assert _kept(f) == [expected, {0, 1, 2, 3}, expected]


@pytest.mark.parametrize("probs,top_p,expected", NUCLEUS_CASES)
def test_nucleus_cases_draws(probs, top_p, expected):
    draws = _draws(probs, top_p=top_p)
    assert set(draws.tolist()) == expected
    # frequencies follow the renormalised nucleus
    p = np.asarray(probs)
    idx = sorted(expected)
    np.testing.assert_allclose([(draws == i).mean() for i in idx], p[idx] / p[idx].sum(), atol=0.04)


def test_top_p_one_keeps_every_nonzero_token():
    # a token of relative probability ~1e-12, one of exactly zero (-inf logit), and a vocabulary
    # large enough that the float32 cumulative sum reaches 1.0 before the tail
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 50_000)).astype(np.float32) * 4
    logits[0, 5] = logits[0].max() - 28.0
    logits[0, 7] = -np.inf
    f, s = _run(logits, top_p=1.0)
    assert _kept(f) == [set(range(50_000)) - {7}, set(range(50_000))]
    # not greedy: every token of non-zero probability is drawn, the zero one never
    draws = _draws([0.5, 0.3, 0.2, 0.0], top_p=1.0)
    assert set(draws.tolist()) == {0, 1, 2}


@pytest.mark.parametrize("probs", [[0.3, 0.1, 0.1, 0.5], [0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]])
def test_top_k_1_and_top_p_is_exactly_argmax(probs):
    expected = {int(np.argmax(probs))}  # first index on ties
    assert _kept(_run(_padded_log(probs, _B), top_k=1, top_p=0.8)[0]) == [expected] * _B
    assert set(_draws(probs, top_k=1, top_p=0.8).tolist()) == expected


TIES = np.full((_B, _V), -np.inf, np.float32)
TIES[:, :4] = [[1.0, 3.0, 3.0, -2.0], [5.0, 5.0, 5.0, 5.0], [-1e30, 2.0, -np.inf, 2.0]]


def test_temperature_zero_is_greedy_first_index_on_ties_no_nan():
    expected = np.array([1, 0, 1])
    np.testing.assert_array_equal(greedy(jnp.asarray(TIES)), expected)
    for seed in range(3):
        f, s = _run(TIES, seed, temperature=0.0, top_k=3, top_p=0.5, min_p=0.2)
        assert not np.isnan(f).any()
        assert _kept(f) == [{1}, {0}, {1}]
        np.testing.assert_array_equal(f[np.arange(3), expected], TIES[np.arange(3), expected])
        np.testing.assert_array_equal(s, expected)
    # Python scalar 0 outside jit
    f = np.asarray(filter_logits(jnp.asarray(TIES), temperature=0.0))
    assert _kept(f) == [{1}, {0}, {1}] and not np.isnan(f).any()
    np.testing.assert_array_equal(sample(jnp.asarray(TIES), jax.random.key(0), temperature=0.0), expected)


def test_mixed_greedy_and_sampled_rows():
    logits = np.zeros((_B, _V), np.float32)
    logits[:, 3] = 0.5
    draws = np.stack([_run(logits, seed, temperature=[0.0, 1.0, 1.0])[1] for seed in range(20)])
    assert (draws[:, 0] == 3).all()
    assert len(set(draws[:, 1].tolist())) > 5


# ---------------------------------------------------------------- seeds and independence


def test_fixed_key_reproducible_and_keys_differ():
    logits = np.random.default_rng(1).normal(size=(4000, _V)).astype(np.float32)
    kw = dict(temperature=0.9, top_k=10, top_p=0.95, min_p=0.01)
    a = _run(logits, 42, **kw)[1]
    np.testing.assert_array_equal(a, _run(logits, 42, **kw)[1])
    assert (a != _run(logits, 43, **kw)[1]).mean() > 0.5
    # legacy uint32 keys work and are reproducible too
    k = jax.random.PRNGKey(7)
    np.testing.assert_array_equal(_run(logits[:_B], key=k)[1], _run(logits[:_B], key=k)[1])


def test_rows_draw_independently():
    # identical uniform rows in one call: consecutive pairs of rows must be uniform over the 16
    # joint outcomes (a shared draw would give only the 4 diagonal pairs)
    draws = _draws([0.25] * 4, seed=3)
    pairs = draws[0::2] * 4 + draws[1::2]
    freq = np.bincount(pairs, minlength=16) / len(pairs)
    np.testing.assert_allclose(freq, 1 / 16, atol=0.025)


def test_per_row_keys():
    logits = np.random.default_rng(2).normal(size=(_B, _V)).astype(np.float32) * 3
    keys = jax.random.split(jax.random.key(5), 3)
    got = _run(logits, key=keys)[1]
    # row i with key i does not depend on the other rows: permuting rows and keys permutes tokens
    perm = np.array([2, 0, 1])
    np.testing.assert_array_equal(_run(logits[perm], key=keys[perm])[1], got[perm])
    with pytest.raises(ValueError, match="key"):
        sample(jnp.asarray(logits), keys[:2])


# ---------------------------------------------------------------- jit with per-row parameters


def test_jit_per_row_params_equal_scalar_calls():
    logits = jnp.asarray(np.random.default_rng(3).normal(size=(_B, _V)) * 3, jnp.float32)
    settings_ = [
        dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0),
        dict(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05),
        dict(temperature=1.5, top_k=0, top_p=0.3, min_p=0.0),
    ]  # each filter statically on and off
    for group in (settings_,):
        per_row = {name: [s[name] for s in group] for name in group[0]}
        f, s = _run(logits, **per_row)
        for i, one in enumerate(group):
            # Python scalars, outside jit (filters that are off are skipped statically)
            ref = np.asarray(filter_logits(logits, **one))[i]
            np.testing.assert_array_equal(f[i], ref, err_msg=str(one))
            assert np.isfinite(f[i, s[i]])
        # same key, same row settings: the same token (each row has its own key from the split)
        assert int(sample(logits, jax.random.key(0), **group[1])[1]) == s[1]
    # inside a device loop, as the engine uses it
    per_row = {name: jnp.asarray([s[name] for s in settings_[:3]]) for name in settings_[0]}
    key = jax.random.key(0)

    def body(i, acc):
        return acc.at[i].set(sample(logits, jax.random.fold_in(key, i), **per_row))

    loop = np.asarray(jax.jit(lambda: jax.lax.fori_loop(0, 8, body, jnp.zeros((8, 3), jnp.int32)))())
    kept = _kept(_run(logits, **per_row)[0])
    for i in range(3):
        assert set(loop[:, i].tolist()) <= kept[i]


# ---------------------------------------------------------------- reference semantics and properties


def _reference_keep(logits, t, k, p, m, slack=1e-4):
    """float64 NumPy reference of the documented semantics for one row; None when a cut is within
    `slack` of a boundary, where float32 rounding may legitimately decide either way."""
    logits = np.asarray(logits, np.float64)
    vocab = len(logits)
    top1 = int(np.argmax(logits))
    keep = np.zeros(vocab, bool)
    if t <= 0:
        keep[top1] = True
        return keep
    z = (logits.astype(np.float32) / np.float32(t)).astype(np.float64)  # scaled in float32
    z[np.abs(z) < np.finfo(np.float32).tiny] = 0.0  # as XLA, which flushes subnormals to zero
    order = np.argsort(-z, kind="stable")
    zs = z[order]
    ks = np.ones(vocab, bool)
    if k > 0:
        ks[k:] = False
    if p < 1:
        w = np.where(ks, np.exp(zs - zs[0]), 0.0)
        probs = w / w.sum()
        before = np.concatenate([[0.0], np.cumsum(probs)[:-1]])
        if np.any(ks & (np.abs(before - p) < slack)):
            return None
        ks &= before < p
    keep[order] = ks
    if m > 0:
        rel = z - z.max()
        if np.any(np.isfinite(rel) & (np.abs(rel - np.log(m)) < slack)):
            return None
        keep &= rel >= np.log(m)
    keep[top1] = True
    return keep & np.isfinite(z)


_logit = st.one_of(
    st.sampled_from([-np.inf, 0.0, 1.0, 2.0]),  # ties and zero-probability tokens
    # XLA flushes subnormal floats to zero, NumPy does not: leave them out
    st.floats(-30, 30, allow_nan=False, allow_subnormal=False, width=32),
)


@st.composite
def _cases(draw):
    rows = []
    for _ in range(_B):
        row = draw(st.lists(_logit, min_size=_V, max_size=_V))
        if not np.isfinite(row).any():
            row[draw(st.integers(0, _V - 1))] = draw(st.floats(-30, 30, allow_subnormal=False, width=32))
        rows.append(row)

    def per_row(strategy):
        return draw(st.lists(strategy, min_size=_B, max_size=_B))

    t = per_row(st.one_of(st.just(0.0), st.floats(0.0625, 4.0, width=32)))
    k = per_row(st.integers(0, _V + 2))
    p = per_row(st.one_of(st.just(1.0), st.floats(0.0001220703125, 1.0, width=32)))
    m = per_row(st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0, width=32)))
    return np.asarray(rows, np.float32), t, k, p, m, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_cases())
def test_property_some_token_always_survives(case):
    logits, t, k, p, m, seed = case
    f, s = _run(logits, seed, temperature=t, top_k=k, top_p=p, min_p=m)
    assert not np.isnan(f).any()
    for i in range(_B):
        kept = np.isfinite(f[i])
        top1 = int(np.argmax(logits[i]))
        assert kept[top1], "the most probable token must always survive"
        assert not (kept & ~np.isfinite(logits[i])).any(), "zero-probability tokens are never kept"
        assert kept[s[i]], "the sampled token must be one of the kept tokens"
        if t[i] <= 0:
            assert kept.sum() == 1 and s[i] == top1
        elif k[i] > 0:
            assert kept.sum() <= k[i]
        ref = _reference_keep(logits[i], t[i], k[i], p[i], m[i])
        if ref is not None:
            np.testing.assert_array_equal(kept, ref, err_msg=f"row {i}: t={t[i]} k={k[i]} p={p[i]} m={m[i]}")


def test_matches_transformers_warpers():
    """Parity with Hugging Face transformers' logits warpers (temperature, top-k, top-p, min-p in
    that order) on continuous random logits, where no ties or exact boundaries occur."""
    import torch
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    rng = np.random.default_rng(4)
    n_kept = []
    ids = torch.zeros((_B, 1), dtype=torch.long)
    for t, k, p, m in [
        (1.0, 0, 0.9, 0.0),
        (0.7, 8, 1.0, 0.0),
        (1.3, 0, 1.0, 0.05),
        (0.8, 10, 0.6, 0.1),
        (2.0, 12, 0.95, 0.02),
        (1.0, 5, 0.3, 0.0),
        (0.5, 0, 0.7, 0.3),
    ]:
        logits = (rng.normal(size=(_B, _V)) * 2.5).astype(np.float32)
        scores = torch.from_numpy(logits.copy())
        warpers = [TemperatureLogitsWarper(t)]
        warpers += [TopKLogitsWarper(k)] if k > 0 else []
        warpers += [TopPLogitsWarper(p)] if p < 1 else []
        warpers += [MinPLogitsWarper(m)] if m > 0 else []
        for w in warpers:
            scores = w(ids, scores)
        ref = scores.numpy()
        ours = _run(logits, temperature=t, top_k=k, top_p=p, min_p=m)[0]
        np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref), err_msg=f"{t=} {k=} {p=} {m=}")
        n_kept += np.isfinite(ref).sum(axis=-1).tolist()
        fin = np.isfinite(ref)
        np.testing.assert_allclose(ours[fin], ref[fin], rtol=1e-6)
    assert max(n_kept) < _V and sum(1 < n < _V for n in n_kept) >= 10  # the cases do filter


# ---------------------------------------------------------------- log-probs and validation


def test_log_probs_of_unfiltered_logits():
    logits = np.random.default_rng(5).normal(size=(_B, _V)).astype(np.float32) * 3
    tokens = np.array([0, 7, 16])
    x = logits.astype(np.float64)
    ref = x - x.max(-1, keepdims=True)
    ref = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
    got = log_probs(jnp.asarray(logits), jnp.asarray(tokens))
    assert got.dtype == jnp.float32 and got.shape == (3,)
    np.testing.assert_allclose(got, ref[np.arange(3), tokens], atol=1e-5)
    # independent of the sampling filters: a token outside top-k still has its model log-prob
    assert np.isfinite(np.asarray(log_probs(jnp.asarray(logits), jnp.argmin(jnp.asarray(logits), -1)))).all()


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.01), "top_p"),
        (dict(top_p=-0.5), "top_p"),
        (dict(min_p=-0.01), "min_p"),
        (dict(min_p=1.5), "min_p"),
        (dict(top_p=np.array([0.5, 0.0])), "top_p"),
        (dict(temperature="hot"), "temperature"),
    ],
)
def test_validate_sampling_names_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        validate_sampling(**kwargs)


def test_validate_sampling_accepts_edges():
    validate_sampling()
    validate_sampling(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0)
    validate_sampling(temperature=2.0, top_k=1, top_p=1e-6, min_p=1.0)
    validate_sampling(temperature=np.array([0.0, 1.0]), top_k=np.array([0, 3]))


def test_filter_rejects_non_2d_logits():
    with pytest.raises(ValueError, match="logits"):
        filter_logits(jnp.zeros((3,)))
    assert sampling.__all__ == ["filter_logits", "sample", "greedy", "log_probs", "validate_sampling"]
