"""Issue 3: the engine on a tiny random model: cached decode == uncached forward, batching, streaming, stops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax.engine import Engine, bucket_length
from llama_jax.kv_cache import init_cache
from llama_jax.model import Llama
from tests.numerics import assert_logits_close, logits_tolerance, relative_tolerance
from tests.reference import LLAMA31_SCALING, randomize, tiny_config

CONFIG = tiny_config(max_seq_len=512, rope_scaling=LLAMA31_SCALING, rope_theta=500000.0)
SIZE = (CONFIG.dim, CONFIG.n_layers)
# log-probabilities of two batch layouts: twice the logits' float32 rounding at D, L; this model's |logits| < 10
LOGPROB_TOL = 2 * relative_tolerance(*SIZE) * 10


def _model(seed=0):
    return randomize(Llama(CONFIG, rngs=nnx.Rngs(seed)), seed, std=0.2)


@pytest.fixture(scope="module")
def engine():
    return Engine(_model(), chunk_size=16)


@pytest.fixture(scope="module")
def reference():
    return _model()


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, CONFIG.vocab_size, n).tolist() for n in lengths]


def test_cached_decode_equals_uncached_forward_every_step(reference):
    """Model level: 9-token prompt, then decode steps at positions 9, 10, ...; stacked and unstacked layers."""
    tokens = jnp.asarray(_prompts([20])[0])[None]
    full = np.asarray(reference(tokens))  # [1, 20, V]
    for unstack in (False, True):
        model = _model()
        if unstack:
            model.unstack_layers()
        cache = init_cache(CONFIG, 1, 32)
        logits, cache = model(tokens[:, :9], kv_cache=cache)
        assert_logits_close(logits, full[:, :9], *SIZE, "prefill")  # float32 rounding at D, L
        for t in range(9, 20):
            assert int(cache.lengths[0]) == t  # first decode writes position 9
            logits, cache = model(tokens[:, t : t + 1], kv_cache=cache)
            assert_logits_close(logits[:, 0], full[:, t], *SIZE, f"decode {t}")


def test_engine_greedy_and_logprobs_equal_uncached_forward(engine, reference):
    prompt = _prompts([9])[0]
    (c,) = engine.generate([prompt], max_new_tokens=10)
    seq = list(prompt)
    for token, logprob in zip(c.tokens, c.logprobs, strict=False):
        logits = np.asarray(reference(jnp.asarray([seq]))[0, -1])
        tol = logits_tolerance(logits, *SIZE)  # float32 rounding at D, L
        expected = int(np.argmax(logits))
        assert token == expected or logits[expected] - logits[token] <= 2 * tol, "not greedy and not a near tie"
        # a log-probability is a logit minus a logsumexp: at most twice the logits' rounding
        assert abs(logprob - float(jax.nn.log_softmax(logits)[token])) <= 2 * tol
        seq.append(token)
    assert len(c.tokens) == 10 and c.finish_reason == "length"


def test_batch_of_different_lengths_equals_each_alone(engine):
    prompts = _prompts([9, 3, 40, 17, 1])  # 40 > chunk 16: chunked prefill
    together = engine.generate(prompts, max_new_tokens=8)
    for prompt, c in zip(prompts, together, strict=False):
        (alone,) = engine.generate([prompt], max_new_tokens=8)
        assert alone.tokens == c.tokens
        np.testing.assert_allclose(alone.logprobs, c.logprobs, atol=LOGPROB_TOL)


def test_padded_rows_do_not_change_a_row(engine):
    prompts = _prompts([5, 12])
    plain = engine.generate(prompts, max_new_tokens=6)
    padded = engine.generate(prompts, max_new_tokens=6, batch_size=8)
    assert [c.tokens for c in plain] == [c.tokens for c in padded]


def test_chunked_prefill_equals_single_block():
    model = _model()
    prompt = _prompts([70])[0]
    chunked = Engine(model, chunk_size=16).generate([prompt], max_new_tokens=5)[0]
    whole = Engine(_model(), chunk_size=128).generate([prompt], max_new_tokens=5)[0]
    assert chunked.tokens == whole.tokens
    np.testing.assert_allclose(chunked.logprobs, whole.logprobs, atol=LOGPROB_TOL)


def test_streaming_equals_device_loop(engine):
    prompts = _prompts([4, 11])
    loop = engine.generate(prompts, max_new_tokens=7, temperature=0.9, top_p=0.95, seed=5)
    items = list(engine.generate(prompts, max_new_tokens=7, temperature=0.9, top_p=0.95, seed=5, stream=True))
    final = items[-1]
    streamed = {0: [], 1: []}
    for row, token, _ in items[:-1]:
        streamed[row].append(token)
    assert [c.tokens for c in final] == [c.tokens for c in loop] == [streamed[0], streamed[1]]


def test_sampling_is_seeded(engine):
    prompts = _prompts([6, 6])
    a = engine.generate(prompts, max_new_tokens=12, temperature=1.0, seed=1)
    b = engine.generate(prompts, max_new_tokens=12, temperature=1.0, seed=1)
    c = engine.generate(prompts, max_new_tokens=12, temperature=1.0, seed=2)
    assert [x.tokens for x in a] == [x.tokens for x in b]
    assert [x.tokens for x in a] != [x.tokens for x in c]
    assert a[0].tokens != a[1].tokens  # identical prompts, independent draws per row


def test_stop_ids_end_each_row_separately(engine):
    prompts = _prompts([5, 8])
    free = engine.generate(prompts, max_new_tokens=10)
    stop = free[0].tokens[3]
    stopped = engine.generate(prompts, max_new_tokens=10, stop_ids=[stop])
    first = free[0].tokens.index(stop)
    assert stopped[0].tokens == free[0].tokens[: first + 1] and stopped[0].finish_reason == "stop"
    other = free[1].tokens
    expected = other[: other.index(stop) + 1] if stop in other else other
    assert stopped[1].tokens == expected


class _DigitTokenizer:
    """Decodes id i as chr(ord('a') + i % 26): enough to test stop strings."""

    stop_ids = frozenset()

    def decode(self, ids):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_stop_strings_cut_the_text(engine):
    prompt = _prompts([5])[0]
    (free,) = engine.generate([prompt], max_new_tokens=10, tokenizer=_DigitTokenizer())
    needle = free.text[4:6]
    (cut,) = engine.generate([prompt], max_new_tokens=10, tokenizer=_DigitTokenizer(), stop_strings=[needle])
    assert cut.text == free.text[: free.text.find(needle)] and cut.finish_reason == "stop"
    assert len(cut.tokens) < 10


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(prompts=[[]]), "empty"),
        (dict(prompts=[[1] * 500], max_new_tokens=20), "max_length"),
        (dict(prompts=[[1, 2]], temperature=-1.0), "temperature"),
        (dict(prompts=[[1, 2]], top_p=0.0), "top_p"),
        (dict(prompts=[[1, 2]], top_p=1.5), "top_p"),
        (dict(prompts=[[1, 2]], top_k=-1), "top_k"),
        (dict(prompts=[[1, 2]], max_new_tokens=0), "max_new_tokens"),
    ],
)
def test_bad_input(engine, kwargs, match):
    with pytest.raises(ValueError, match=match):
        engine.generate(**kwargs)


def test_buckets_bound_compilations():
    assert [bucket_length(n, 512) for n in (1, 16, 17, 100, 511, 4000)] == [16, 16, 32, 128, 512, 512]
