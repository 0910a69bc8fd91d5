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


# ------------------------------------------------------------------------------------------- paged running batch
def test_paged_attend_equals_reference_attention():
    """attention.paged_attend (online softmax over blocks fetched through page tables) equals the dense oracle
    over the same keys/values: rows of ragged lengths on pages out of order, an idle row holding no page, and
    key blocks of one page and of several."""
    from llama_jax.attention import paged_attend, reference_attention

    rng = np.random.default_rng(1)
    b, p, m, n_pool, t = 4, 8, 6, 30, 3
    k_heads, h, n = CONFIG.n_kv_heads, CONFIG.head_dim, CONFIG.n_heads
    lengths = [45, 9, 20, 0]  # the last row is idle (no pages)
    pool_k = rng.normal(size=(2, n_pool, p, k_heads, h)).astype(np.float32)
    pool_v = rng.normal(size=(2, n_pool, p, k_heads, h)).astype(np.float32)
    table = np.full((b, m), n_pool, np.int32)
    perm = iter(rng.permutation(n_pool).tolist())
    for row, length in enumerate(lengths):
        for j in range(-(-length // p)):
            table[row, j] = next(perm)
    q = rng.normal(size=(b, t, n, h)).astype(np.float32)
    q_pos = np.stack([np.maximum(length - t + np.arange(t), 0) for length in lengths]).astype(np.int32)
    dense_k = np.stack([pool_k[1, np.minimum(table[r], n_pool - 1)].reshape(m * p, k_heads, h) for r in range(b)])
    dense_v = np.stack([pool_v[1, np.minimum(table[r], n_pool - 1)].reshape(m * p, k_heads, h) for r in range(b)])
    mask = np.arange(m * p)[None, None, :] <= q_pos[:, :, None]
    ref = np.asarray(reference_attention(*map(jnp.asarray, (q, dense_k, dense_v, mask))))
    for block in (p, 3 * p, 1024):
        got = jax.jit(paged_attend, static_argnames=("block_size",))(
            *map(jnp.asarray, (q, pool_k, pool_v, table, q_pos)), layer=jnp.int32(1), block_size=block
        )
        # float32 online vs one-pass softmax over <= 48 keys of O(1) scores: a few ulps of O(1) outputs
        np.testing.assert_allclose(np.asarray(got)[:3], ref[:3], rtol=1e-5, atol=1e-5, err_msg=f"block {block}")
        assert np.all(np.asarray(got)[3] == 0)  # an idle row attends to nothing


def _logprob_tolerance(engine, prompt) -> float:
    """float32 rounding of log p = logit - logsumexp(logits): twice the logits' bound (tests/numerics.py) at this
    model's depth and width, relative to max |logit| of the prompt's next-token logits."""
    from tests.numerics import logits_tolerance

    _, logits = engine.prefill([prompt], engine.new_cache(1, engine.max_length))
    return 2 * logits_tolerance(np.asarray(logits), engine.config.dim, engine.config.n_layers)


def _paged_vs_dense(engine, prompts, max_tokens, max_batch, **kw):
    out = {}
    for layout in ("dense", "paged"):
        with Scheduler(engine, ByteTokenizer(), max_batch=max_batch, stop_ids=(), kv_layout=layout, **kw) as s:
            out[layout] = _run(s, prompts, max_tokens=max_tokens)
            out[layout + "_stats"] = s.stats()
    return out


def test_paged_equals_dense_ragged_batch(engine):
    """A ragged batch (rows of 3..90 prompt tokens that cross page edges while decoding, joining as rows free)
    gives the same greedy tokens and log-probabilities with the paged KV cache as with the dense one."""
    prompts = _prompts([5, 40, 14, 3, 29, 90, 17, 63], seed=11)
    out = _paged_vs_dense(engine, prompts, max_tokens=20, max_batch=3, page_size=8)
    tol = max(_logprob_tolerance(engine, p) for p in prompts[:2])
    for d, p in zip(out["dense"], out["paged"], strict=True):
        assert p.tokens == d.tokens
        np.testing.assert_allclose(p.logprobs, d.logprobs, rtol=0, atol=tol)
    pages = out["paged_stats"]["kv_pages"]
    assert pages["free"] == pages["total"] and pages["in_use"] == pages["promised"] == 0


def test_pages_returned_when_requests_end_or_are_cancelled(engine):
    [p] = _prompts([30], seed=12)
    with Scheduler(engine, ByteTokenizer(), max_batch=2, stop_ids=(), page_size=16) as s:
        total = s.stats()["kv_pages"]["total"]
        assert total == 2 * (MAX_LENGTH // 16)  # the dense cache's bytes
        q = queue.Queue()
        r = s.submit(Request(p, SamplingParams(max_tokens=MAX_LENGTH - 30), q.put))
        assert q.get(timeout=300).kind == "token"
        held = s.stats()["kv_pages"]
        # a 30-token prompt holds 2 pages (+1 when decoding crosses position 32), not the 8 of a dense row
        assert 2 <= held["in_use"] <= 3 and held["free"] == total - held["in_use"]
        s.cancel(r)
        while (ev := q.get(timeout=300)).kind == "token":
            pass
        assert ev.result.finish_reason == "cancelled"
        _run(s, _prompts([7, 50], seed=13), max_tokens=10)
        after = s.stats()["kv_pages"]
    assert after["free"] == total and after["in_use"] == 0 and after["promised"] == 0


def test_prefix_hits_share_pages_by_reference(engine):
    """Two running requests with the same 40-token prefix hold its 2 full pages once (referenced twice); when
    they end, the pages stay cached and every other page is free."""
    [a] = _prompts([40], seed=14)
    prompts = [a + [1, 2, 3], a + [4, 5]]
    with Scheduler(engine, ByteTokenizer(), max_batch=2, stop_ids=(), page_size=16, prefix_cache_pages=4) as s:
        [first] = _run(s, prompts[:1], max_tokens=40)
        qs = [queue.Queue(), queue.Queue()]
        for pr, q in zip(prompts, qs, strict=True):
            s.submit(Request(pr, SamplingParams(max_tokens=40), q.put))
        assert qs[0].get(timeout=300).kind == qs[1].get(timeout=300).kind == "token"
        both = s.stats()["kv_pages"]
        results = []
        for q in qs:
            while (ev := q.get(timeout=300)).kind == "token":
                pass
            results.append(ev.result)
        after = s.stats()
    assert results[0].tokens == first.tokens  # a hit gives the tokens of the miss
    # unshared, each row would hold ceil(43 / 16) = 3 pages at the start; sharing 2 saves 2
    assert both["in_use"] <= 2 + 2 * 2 + 2  # shared prefix + own tail pages (+1 each after crossing a page edge)
    assert after["prefix_cache_hit_tokens"] == 2 * 32
    pages = after["kv_pages"]
    assert pages["in_use"] == 0 and pages["free"] + pages["cached"] == pages["total"] and pages["cached"] >= 2


def test_request_waits_when_its_pages_are_not_free(engine):
    """With a pool of 10 pages, two requests of 6 pages each cannot run together: the second waits for the first
    to end (instead of taking its pages), and both get the tokens they get alone."""
    a, b = _prompts([60, 55], seed=15)
    alone = [engine.generate([x], max_new_tokens=30)[0].tokens for x in (a, b)]
    with Scheduler(engine, ByteTokenizer(), max_batch=2, stop_ids=(), page_size=16, num_pages=10) as s:
        events = queue.Queue()
        for i, x in enumerate((a, b)):
            s.submit(Request(x, SamplingParams(max_tokens=30), lambda e, i=i: events.put((i, e.kind, e.result))))
        order, results = [], {}
        while len(results) < 2:
            i, kind, result = events.get(timeout=300)
            order.append((i, kind))
            if kind == "done":
                results[i] = result
        stats = s.stats()["kv_pages"]
    first_of_b = order.index((1, "token"))
    assert order.index((0, "done")) < first_of_b  # b started only after a returned its pages
    assert [results[0].tokens, results[1].tokens] == alone
    assert stats["free"] == stats["total"] == 10
    small = Scheduler(engine, ByteTokenizer(), max_batch=2, stop_ids=(), page_size=16, num_pages=5)
    with pytest.raises(ValueError, match=r"needs 6 KV-cache pages .* pool holds 5 \(num_pages\)"):
        small.check(a, SamplingParams(max_tokens=30))  # 90 tokens: 6 pages can never fit


def test_smollm2_paged_equals_dense(smollm2_checkpoint):
    """SmolLM2-135M-Instruct: a ragged batch of real prompts (one crossing several 16-token pages while decoding,
    rows joining as others end) gives the same greedy tokens and log-probabilities paged as dense."""
    from llama_jax import checkpoint
    from llama_jax.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(checkpoint.tokenizer_dir(smollm2_checkpoint))
    engine = Engine(checkpoint.load(smollm2_checkpoint), max_length=256, chunk_size=64)
    texts = [
        "The capital of France is",
        "Water freezes at",
        "Once upon a time, in a small village by the sea, there lived an old fisherman who every morning",
        "1, 2, 3, 4,",
        "def fibonacci(n):",
    ]
    prompts = [tokenizer.encode(t) for t in texts]
    out = {}
    for layout in ("dense", "paged"):
        with Scheduler(engine, tokenizer, max_batch=3, stop_ids=(), kv_layout=layout, page_size=16) as s:
            out[layout] = _run(s, prompts, max_tokens=24)
            out[layout + "_stats"] = s.stats()
    tol = max(_logprob_tolerance(engine, p) for p in prompts)
    for d, p in zip(out["dense"], out["paged"], strict=True):
        assert p.tokens == d.tokens and p.text == d.text
        np.testing.assert_allclose(p.logprobs, d.logprobs, rtol=0, atol=tol)
    assert len({tuple(r.tokens) for r in out["paged"]}) == len(prompts)  # real, distinct continuations
    pages = out["paged_stats"]["kv_pages"]
    assert pages["free"] == pages["total"] == 3 * 256 // 16


def test_paged_requests_do_not_recompile(engine):
    """The pool and page-table shapes are fixed at startup: requests of other lengths, page counts and rows reuse
    the compiled decode dispatch and row insert (prefill compiles once per chunk bucket, as dense)."""
    from llama_jax.engine import insert_paged

    with Scheduler(engine, ByteTokenizer(), max_batch=2, stop_ids=(), page_size=8) as s:
        _run(s, _prompts([5, 9], seed=20), max_tokens=6)
        before = engine._decode_steps._cache_size(), insert_paged._cache_size()
        _run(s, _prompts([3, 14, 11, 7], seed=21), max_tokens=15)  # more pages per row, rows refilled
        after = engine._decode_steps._cache_size(), insert_paged._cache_size()
    assert after == before
