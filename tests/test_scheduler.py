"""llama_jax.scheduler and the paged KV cache (issue 16) on a tiny random model, in process: continuous batching
across requests equals generating each prompt alone, prefix-cache hits give the tokens of a miss (with LRU
eviction), cancellation and a full queue, and paged attention equals dense attention."""

import queue

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax.engine import Engine
from llama_jax.kv_cache import gather_pages, init_paged_cache, paged_attention, paged_write
from llama_jax.model import Llama, attention_mask, dot_product_attention
from llama_jax.scheduler import QueueFull, Request, SamplingParams, Scheduler
from tests.reference import randomize, tiny_config

CONFIG = tiny_config(max_seq_len=512)
MAX_LENGTH = 128


class ByteTokenizer:
    """Ids 0..255 as bytes: enough text for stop strings and streaming on the tiny vocabulary."""

    stop_ids = frozenset()

    def decode(self, ids):
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def engine():
    return Engine(randomize(Llama(CONFIG, rngs=nnx.Rngs(0)), 0, std=0.2), max_length=MAX_LENGTH, chunk_size=16)


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, CONFIG.vocab_size, n).tolist() for n in lengths]


def _run(scheduler, prompts, max_tokens=8, **kw):
    """Submits every prompt at once; returns their Results in order."""
    qs = []
    for p in prompts:
        q = queue.Queue()
        scheduler.submit(Request(p, SamplingParams(max_tokens=max_tokens, **kw), q.put))
        qs.append(q)
    out = []
    for q in qs:
        while (ev := q.get(timeout=300)).kind == "token":
            pass
        assert ev.kind == "done", ev.error
        out.append(ev.result)
    return out


def test_continuous_batching_equals_each_prompt_alone(engine):
    prompts = _prompts([5, 40, 17, 3, 29])
    alone = [engine.generate([p], max_new_tokens=8)[0].tokens for p in prompts]
    with Scheduler(engine, ByteTokenizer(), max_batch=2, stop_ids=()) as s:
        got = _run(s, prompts)
        stats = s.stats()
    assert [r.tokens for r in got] == alone
    assert all(r.finish_reason == "length" for r in got)
    assert stats["finished"] == 5 and stats["rows_in_use"] == 0


def test_generate_equals_engine_generate_continuous(engine):
    prompts = _prompts([9, 33, 4, 21, 15, 2], seed=5)
    ref = dict(engine.generate_continuous(prompts, batch_size=2, max_new_tokens=6))
    with Scheduler(engine, ByteTokenizer(), max_batch=2, max_queue=1, stop_ids=()) as s:
        got = dict(s.generate(prompts, SamplingParams(max_tokens=6), timeout=300))
    assert sorted(got) == list(range(len(prompts)))
    assert [got[i].tokens for i in range(len(prompts))] == [ref[i].tokens for i in range(len(prompts))]


def test_prefix_cache_hit_gives_the_tokens_of_a_miss(engine):
    a, b, c = _prompts([45, 25, 70], seed=1)
    prompts = [a, a, a[:20] + b, c, a]  # repeat, shared first page, a long one that evicts, repeat
    with Scheduler(engine, ByteTokenizer(), max_batch=1, stop_ids=()) as s:
        miss = _run(s, prompts)
    with Scheduler(engine, ByteTokenizer(), max_batch=1, stop_ids=(), prefix_cache_pages=5, page_size=16) as s:
        hit = []
        for p in prompts:  # one at a time: each sees the pages of the ones before
            hit += _run(s, [p])
        stats = s.stats()
    assert [r.tokens for r in hit] == [r.tokens for r in miss]
    # float32 on the same shapes but other chunk boundaries: log-probabilities agree to rounding
    for h, m in zip(hit, miss, strict=True):
        np.testing.assert_allclose(h.logprobs, m.logprobs, rtol=1e-5, atol=1e-5)
    # a: 2 full pages (44 of 45 tokens may come from the cache -> 32); a[:20]+b: 1 page; c evicts (5-page pool);
    # the last a finds what survived LRU eviction
    pc = stats["prefix_cache"]
    assert pc["pages_cached"] <= 5 and pc["hits"] >= 2
    total = sum(len(p) for p in prompts)
    assert stats["prompt_tokens_prefilled"] + stats["prefix_cache_hit_tokens"] == total
    assert stats["prefix_cache_hit_tokens"] >= 32 + 16


def test_stop_string_and_sampling_settings(engine):
    [p] = _prompts([12], seed=3)
    with Scheduler(engine, ByteTokenizer(), max_batch=2, stop_ids=()) as s:
        [greedy] = _run(s, [p], max_tokens=16)
        text = greedy.text
        stop = text[3:5] if len(text) >= 5 and "\ufffd" not in text[:5] else None
        if stop:
            [cut] = _run(s, [p], max_tokens=16, stop=(stop,))
            assert cut.finish_reason == "stop" and cut.text == text[: text.find(stop)]
        r1, r2 = _run(s, [p, p], max_tokens=8, temperature=1.0, seed=7)
    assert len(r1.tokens) == len(r2.tokens) == 8


def test_cancel_frees_the_row_and_queue_full(engine):
    [p] = _prompts([10], seed=4)
    with Scheduler(engine, ByteTokenizer(), max_batch=1, max_queue=1, stop_ids=()) as s:
        q = queue.Queue()
        r = s.submit(Request(p, SamplingParams(max_tokens=MAX_LENGTH - 10), q.put))
        assert q.get(timeout=300).kind == "token"  # running
        s.submit(Request(p, SamplingParams(max_tokens=2), lambda e: None))  # waits
        with pytest.raises(QueueFull):
            s.submit(Request(p, SamplingParams(max_tokens=2), lambda e: None))
        s.cancel(r)
        while (ev := q.get(timeout=300)).kind == "token":
            pass
        assert ev.result.finish_reason == "cancelled" and len(ev.result.tokens) < MAX_LENGTH - 10
    with pytest.raises(ValueError, match="maximum context length is 128"):
        s.check(p, SamplingParams(max_tokens=MAX_LENGTH))


def test_paged_attention_equals_dense():
    """Keys/values written through scattered page tables and read back by paged_attention equal the dense
    attention over the same keys/values."""
    rng = np.random.default_rng(0)
    b, s, p, t = 3, 48, 16, 5
    n_pages = 12
    cache = init_paged_cache(CONFIG, n_pages, p, b, s // p)
    perm = rng.permutation(n_pages)[: b * (s // p)].reshape(b, s // p)  # each row's pages, out of order
    cache = cache.replace(page_table=jnp.asarray(perm, jnp.int32))
    k_heads, h, n = CONFIG.n_kv_heads, CONFIG.head_dim, CONFIG.n_heads
    k = jnp.asarray(rng.normal(size=(b, s, k_heads, h)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, s, k_heads, h)), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    cache = paged_write(cache, 1, positions, k, v)
    np.testing.assert_array_equal(gather_pages(cache.k_pages, cache.page_table)[1], k)
    q = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
    q_pos = jnp.asarray(rng.integers(0, s, (b, t)), jnp.int32)
    dense = dot_product_attention(q, k, v, attention_mask(q_pos, positions))
    paged = jax.jit(paged_attention, static_argnames=("layer",))(q, cache, layer=1, q_positions=q_pos)
    # the same float32 math, compiled vs eager (XLA may fuse the softmax differently): a few ulps of O(1) values
    np.testing.assert_allclose(paged, dense, rtol=1e-6, atol=1e-6)


def test_paged_fits_more_requests_than_dense():
    """With one cache budget, a realistic mix (many short, a few long) fits more rows paged than dense."""
    from experiments.bench_serve import concurrency_fit

    lengths = [200] * 28 + [3000] * 4
    fit = concurrency_fit(lengths, budget_tokens=16 * 4096, max_length=4096, page_size=16)
    assert fit["dense"] == 16 and fit["paged"] == len(lengths) > fit["dense"]
