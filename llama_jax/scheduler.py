"""The host-side scheduler: one worker thread owns an :class:`llama_jax.engine.Engine` and serves requests.

Design (ARCHITECTURE.md, "Where new work goes"; the continuous batching of vLLM / Orca, Yu et al. 2022,
"Orca: A Distributed Serving System for Transformer-Based Generative Models", OSDI, section 3.2):

* **Rows and the running state.** The scheduler keeps one :class:`llama_jax.engine.DecodeState` of
  ``max_batch`` rows. A free row is "done" on the device and idles through decode steps.
* **Paged KV cache** (``kv_layout="paged"``, the default): the state's cache is a
  :class:`llama_jax.kv_cache.PagedKVCache`, a pool of pages of P tokens per layer and a page table per row
  (int32 [max_batch, ceil(max_length / P)]; pool size and table width fixed at construction, so nothing
  recompiles per request). :class:`PagePool` decides which row holds which page: a request is admitted when the
  pages of its whole length (prompt + max_tokens) can be promised to it (else it waits in the queue: a row never
  runs out of pages and never takes another's), its prompt's pages are allocated and prefilled through its page
  table, one more page is allocated whenever decoding is about to cross a page edge, and all of them go back when
  it ends or is cancelled. Attention reads a row's pages through its table
  (:func:`llama_jax.attention.paged_attend`, visiting only the pages up to the batch's longest row).
  ``kv_layout="dense"`` keeps the dense cache (every row reserves ``engine.max_length`` slots).
* **Continuous batching.** A request waits in a FIFO queue (at most ``max_queue`` long: :class:`QueueFull`
  beyond) until a row is free; it then joins the running batch at once through :meth:`Engine.insert` (its
  prompt is prefilled into a 1-row cache and scattered into the row, and its first token sampled), while the other
  rows keep their state. Decoding runs ``steps_per_dispatch`` steps per device call; between calls the host
  streams new tokens, checks stop strings and cancellations, and refills free rows.
* **Per-request settings**: ``max_tokens``, temperature / top-k / top-p / min-p (per row on the device; the
  static :class:`SamplingMode` is the union of the rows in use), stop strings (host side, the text is cut before
  the stop), stop ids (the model's, shared by all rows), ``seed`` (re-seeds the batch's PRNG key when the request
  joins: its tokens are reproducible when it runs alone; with other sampled rows in the batch the draws are
  shared).
* **Log-probabilities.** Every generated token carries its log-probability under the unfiltered distribution
  (the engine's). A request asking for top-``logprobs`` alternatives or for the prompt's log-probabilities
  (``echo``) is scored after it finishes by one forward pass over prompt + generated tokens
  (:meth:`Scheduler.score`, jitted per power-of-two length bucket): log p(token_t | tokens_<t) of every token
  from position 1 on and the top-k alternatives there, full float32 log-softmax, the same figures as
  ``experiments/eval.py``'s scorer.
* **Streaming and cancellation.** Each request has a ``sink`` callable that receives :class:`Event` objects from
  the worker thread (``"token"`` with the new text, ``"done"`` with the :class:`Result`, ``"error"``); it must not
  block (a server hands them to its event loop). :meth:`Scheduler.cancel` frees the request's row before the
  next dispatch (a client that disconnects loses nothing but its own row).
* **Prefix cache** (``prefix_cache_pages > 0``): the full pages of a prompt that an earlier prompt already had
  (same tokens from position 0) are not prefilled again; only the rest of the prompt is computed, in chunks
  starting at the first uncached position. Paged, the cached pages are pool pages put into the new row's page
  table by reference (:class:`PagePool`); dense, they are copied from a separate pool into the row
  (:class:`PrefixCache`).
* **Shutdown.** :meth:`Scheduler.shutdown` refuses new requests, fails the waiting ones with an ``"error"`` event,
  lets the running ones finish (up to ``timeout`` seconds, then fails them too) and joins the thread.

Nothing here touches HTTP: :mod:`llama_jax.serve` puts the OpenAI API on top.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import queue as queue_lib
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax import sampling
from llama_jax.engine import (
    MIN_BUCKET,
    DecodeState,
    Engine,
    SamplingMode,
    bucket_length,
    insert_paged,
    new_paged_cache,
    prefill_paged,
)
from llama_jax.kv_cache import KVCache, gather_pages, init_paged_cache, scatter_set

#: Largest number of top log-probability alternatives a request may ask for (OpenAI's completions limit is 5,
#: chat's top_logprobs 20).
MAX_TOP_LOGPROBS = 20
#: KV-cache layouts of the running batch (:class:`Scheduler`'s ``kv_layout``).
KV_LAYOUTS = ("paged", "dense")


class QueueFull(RuntimeError):
    """The waiting queue holds ``max_queue`` requests; retry later."""


class ShuttingDown(RuntimeError):
    """The scheduler no longer accepts requests."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings.

    ``max_tokens`` new tokens at most (0: only score the prompt, see ``echo``); ``temperature`` (0 = greedy),
    ``top_k`` (0 = off), ``top_p`` (1 = off), ``min_p`` (0 = off) as :mod:`llama_jax.sampling`; ``stop``: stop
    strings (the text is cut before the first one found); ``logprobs``: number of top alternatives (0..20) to
    report per generated token, or None; ``echo``: also report the prompt tokens' log-probabilities; ``seed``:
    re-seed the PRNG when the request joins (None: keep the running key).
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    echo: bool = False
    seed: int | None = None

    def validate(self) -> None:
        """Raises ValueError naming the bad field."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise ValueError(f"max_tokens must be an integer >= 0, got {self.max_tokens!r}")
        sampling.validate_sampling(self.temperature, self.top_k, self.top_p, self.min_p)
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {list(self.stop)!r}")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens must be >= 1 (0 is allowed only with echo)")


@dataclasses.dataclass
class Result:
    """A finished request.

    ``tokens``/``logprobs``: generated ids and their log-probabilities (stop id included when one ended it);
    ``text``: decoded generation without the stop id / stop string; ``finish_reason``: "stop", "length" or
    "cancelled"; ``prompt_logprobs``: with echo, log p of each prompt token (None for the first);
    ``top_logprobs``: with logprobs=k, per token (prompt tokens first when echoing, then generated tokens) a list
    of (id, logprob) of the k most probable tokens at that position (None for the first prompt token);
    ``timing``: seconds from submission to the first token (``ttft``) and to the end (``total``).
    """

    prompt_tokens: list[int]
    tokens: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str
    prompt_logprobs: list[float | None] | None = None
    top_logprobs: list[list[tuple[int, float]] | None] | None = None
    timing: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Event:
    """What a request's sink receives: kind "token" (``text`` = new text, ``token_ids``/``logprobs`` the new
    tokens), "done" (``result``) or "error" (``error`` message). "done" or "error" is always the last event."""

    kind: str
    text: str = ""
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()
    result: Result | None = None
    error: str | None = None


_ids = itertools.count()


class Request:
    """One generation request: token ids ``prompt``, :class:`SamplingParams` and a ``sink`` for its events."""

    def __init__(self, prompt: Sequence[int], params: SamplingParams, sink: Callable[[Event], None]):
        self.id = next(_ids)
        self.prompt = [int(t) for t in prompt]
        self.params = params
        self.sink = sink
        self.cancelled = False
        self.submitted = time.perf_counter()
        self.first_token_time: float | None = None
        # host-side progress while in a row
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.sent_text = ""
        self.finished = False

    def _send(self, event: Event) -> None:
        try:
            self.sink(event)
        except Exception:  # noqa: BLE001 - a broken sink must not stop the scheduler
            self.cancelled = True


def _row_settings(p: SamplingParams) -> tuple:
    """A request's per-row device arguments for a row insert: max_tokens, temperature, top_k, top_p, min_p."""
    return (
        jnp.int32(p.max_tokens),
        jnp.float32(p.temperature),
        jnp.int32(p.top_k),
        jnp.float32(p.top_p),
        jnp.float32(p.min_p),
    )


class Scheduler:
    """Owns ``engine`` in one worker thread; requests join its running batch as rows free up.

    Args:
      engine: the compiled model; its ``max_length`` is every row's cache length (prompt + new tokens).
      tokenizer: decodes the text of each request (stop strings, streaming).
      max_batch: rows decoded together.
      max_queue: requests allowed to wait for a row; :meth:`submit` raises :class:`QueueFull` beyond.
      steps_per_dispatch: decode steps per device call between host checks.
      stop_ids: ids that end a request (default ``tokenizer.stop_ids``), shared by all rows.
      seed: initial PRNG seed.
      prefix_cache_pages: pages of ``page_size`` tokens kept by the prefix cache (0: no prefix cache).
      page_size: tokens per page (P) of the paged KV cache and of the prefix cache.
      kv_layout: "paged" (default): the running batch's KV cache is a pool of ``num_pages`` pages of P tokens
        per layer and a page table per row (:class:`PagePool`; single device, float K/V); a row holds only the
        pages its tokens use and prefix-cache hits share pages by reference. "dense": every row reserves
        ``engine.max_length`` slots (the prefix cache then copies pages from its own pool).
      num_pages: pages of the paged pool; default the dense cache's bytes, ``max_batch`` x
        ceil(max_length / P), plus ``prefix_cache_pages``.
      max_length: longest request (prompt + max_tokens) and the row length of the dense cache; default (and at
        most) ``engine.max_length``.

    Call :meth:`start` (or use it as a context manager) before :meth:`submit`; :meth:`shutdown` at the end.
    """

    def __init__(
        self,
        engine: Engine,
        tokenizer,
        *,
        max_batch: int = 16,
        max_queue: int = 64,
        steps_per_dispatch: int = 4,
        stop_ids: Sequence[int] | None = None,
        seed: int = 0,
        prefix_cache_pages: int = 0,
        page_size: int = 16,
        kv_layout: str = "paged",
        num_pages: int | None = None,
        max_length: int | None = None,
    ):
        if kv_layout not in KV_LAYOUTS:
            raise ValueError(f"kv_layout must be one of {KV_LAYOUTS}, got {kv_layout!r}")
        if max_batch < 1 or max_queue < 0 or steps_per_dispatch < 1:
            raise ValueError(
                f"max_batch and steps_per_dispatch must be >= 1 and max_queue >= 0, got {max_batch}, "
                f"{steps_per_dispatch}, {max_queue}"
            )
        self.engine = engine
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.steps_per_dispatch = steps_per_dispatch
        if max_length is not None and not 2 <= max_length <= engine.max_length:
            raise ValueError(f"max_length must be in [2, {engine.max_length}] (the engine's), got {max_length}")
        self.max_length = engine.max_length if max_length is None else max_length
        self.stop_ids = frozenset(int(s) for s in (tokenizer.stop_ids if stop_ids is None else stop_ids))
        self.seed = seed
        self._cond = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._rows: list[Request | None] = [None] * max_batch
        self._stopping = False
        self._deadline: float | None = None
        self._thread: threading.Thread | None = None
        self._stats = collections.Counter()
        self._score_fns: dict = {}
        graphdef = engine.graphdef

        def score(params, tokens, k: int):
            """tokens int32 [1, T] -> log p of tokens[1:] [T-1], top-k (values [T-1, k], ids [T-1, k])."""
            model = nnx.merge(graphdef, params)
            logits = model(tokens)  # [1, T, V] float32
            logp = jax.nn.log_softmax(logits[0, :-1].astype(jnp.float32), axis=-1)  # [T-1, V]
            chosen = jnp.take_along_axis(logp, tokens[0, 1:, None], axis=-1)[:, 0]  # [T-1]
            values, ids = jax.lax.top_k(logp, k)  # [T-1, k]
            return chosen, values, ids

        self._score = jax.jit(score, static_argnames=("k",))
        self.kv_layout = kv_layout
        self.prefix_cache = None
        self.pool: PagePool | None = None
        if kv_layout == "dense":
            self.prefix_cache = PrefixCache(engine, prefix_cache_pages, page_size) if prefix_cache_pages else None
            return
        if page_size < 1 or prefix_cache_pages < 0:
            raise ValueError(
                f"page_size must be >= 1 and prefix_cache_pages >= 0, got {page_size}, {prefix_cache_pages}"
            )
        if engine.mesh is not None or (engine.kv_dtype is not None and jnp.dtype(engine.kv_dtype) == jnp.int8):
            raise ValueError("kv_layout='paged' needs a single-device engine with a float KV cache; use 'dense'")
        self.pages_per_row = -(-self.max_length // page_size)
        if num_pages is None:  # the dense cache's bytes (max_batch rows of max_length) + the prefix cache's pages
            num_pages = max_batch * self.pages_per_row + prefix_cache_pages
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        self.pool = PagePool(num_pages, page_size, prefix_cache_pages)
        self._table = np.full((max_batch, self.pages_per_row), num_pages, np.int32)  # host copy of the page table
        self._row_pages: list[list[int]] = [[] for _ in range(max_batch)]
        self._row_promise = [0] * max_batch  # own pages a row may still allocate

    # ------------------------------------------------------------------ public API
    def __enter__(self) -> Scheduler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def start(self) -> Scheduler:
        """Starts the worker thread (idempotent)."""
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="llama-jax-scheduler", daemon=True)
                self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        """Whether the worker thread is running (False before :meth:`start`, after shutdown or a crash)."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def check(self, prompt: Sequence[int], params: SamplingParams) -> None:
        """Raises ValueError (naming the field or the limit) if a request cannot run: empty prompt, ids outside
        the vocabulary, prompt + max_tokens longer than ``max_length``, bad settings."""
        params.validate()
        if len(prompt) == 0:
            raise ValueError("prompt is empty")
        vocab = self.engine.config.vocab_size
        bad = [t for t in prompt if not 0 <= int(t) < vocab]
        if bad:
            raise ValueError(f"prompt holds token id {bad[0]} outside the vocabulary [0, {vocab})")
        need = len(prompt) + params.max_tokens
        if need > self.max_length or (params.max_tokens == 0 and len(prompt) > self.max_length):
            raise ValueError(
                f"this model's maximum context length is {self.max_length} tokens; the prompt has "
                f"{len(prompt)} tokens and max_tokens is {params.max_tokens} ({need} in all)"
            )
        if self.pool is not None and params.max_tokens and self.pool.pages_for(need) > self.pool.num_pages:
            raise ValueError(
                f"the request needs {self.pool.pages_for(need)} KV-cache pages of {self.pool.page_size} tokens "
                f"({need} tokens); the pool holds {self.pool.num_pages} (num_pages)"
            )

    def submit(self, request: Request) -> Request:
        """Queues ``request``. Raises ValueError (see :meth:`check`), :class:`QueueFull`, :class:`ShuttingDown`."""
        self.check(request.prompt, request.params)
        with self._cond:
            if self._stopping or self._thread is None:
                raise ShuttingDown("the server is shutting down" if self._stopping else "scheduler not started")
            free = sum(r is None for r in self._rows)
            if len(self._waiting) >= self.max_queue + free:
                raise QueueFull(f"the queue holds {len(self._waiting)} requests (max_queue {self.max_queue})")
            self._waiting.append(request)
            self._stats["submitted"] += 1
            self._cond.notify_all()
        return request

    def cancel(self, request: Request) -> None:
        """Frees ``request``'s row (or drops it from the queue) before the next dispatch; no more events are
        sent to it except a final "done" with finish_reason "cancelled"."""
        with self._cond:
            request.cancelled = True
            self._cond.notify_all()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stops accepting requests, fails the waiting ones, lets running ones finish for up to ``timeout``
        seconds (then fails them), and joins the worker thread."""
        with self._cond:
            self._stopping = True
            self._deadline = time.perf_counter() + timeout
            waiting, self._waiting = list(self._waiting), collections.deque()
            self._cond.notify_all()
        for r in waiting:
            r._send(Event("error", error="the server is shutting down"))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout + 60)

    def stats(self) -> dict:
        """Rows in use, requests waiting, and counters (submitted, finished, cancelled, prompt tokens prefilled,
        tokens generated)."""
        with self._cond:
            counters = {
                k: self._stats[k]
                for k in (
                    "submitted",
                    "finished",
                    "cancelled",
                    "prompt_tokens_prefilled",
                    "prefix_cache_hit_tokens",
                    "tokens_generated",
                )
            }
            out = {
                "rows": self.max_batch,
                "rows_in_use": sum(r is not None for r in self._rows),
                "waiting": len(self._waiting),
                **counters,
            }
        if self.prefix_cache is not None:
            out["prefix_cache"] = self.prefix_cache.stats()
        if self.pool is not None:
            out["kv_pages"] = self.pool.stats()
            if self.pool.cache_pages:
                out["prefix_cache"] = self.pool.prefix_stats()
        return out

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, timeout: float | None = None
    ) -> Iterator[tuple[int, Result]]:
        """Runs every prompt through the running batch (the batch-job path of ``generate --output``): submits
        them as the queue has room and yields ``(index, Result)`` as each finishes (finishing order). Greedy
        results equal :meth:`Engine.generate_continuous`'s. Raises ValueError (see :meth:`check`) before
        anything runs, RuntimeError if a request fails; ``timeout`` bounds the wait for each result."""
        for p in prompts:
            self.check(p, params)
        events: queue_lib.Queue = queue_lib.Queue()
        todo = list(range(len(prompts)))[::-1]
        running: dict[int, Request] = {}
        try:
            while todo or running:
                while todo:
                    i = todo[-1]
                    try:
                        running[i] = self.submit(Request(prompts[i], params, lambda e, i=i: events.put((i, e))))
                    except QueueFull:
                        if not running:
                            raise
                        break
                    todo.pop()
                i, ev = events.get(timeout=timeout)
                if ev.kind == "error":
                    raise RuntimeError(f"prompt {i}: {ev.error}")
                if ev.kind == "done":
                    del running[i]
                    yield i, ev.result
        finally:
            for r in running.values():
                self.cancel(r)

    def score(self, tokens: Sequence[int], k: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Log-likelihoods of ``tokens`` (call from the worker thread or when it is idle).

        Returns float64 [T-1] log p(tokens[t] | tokens[:t]) for t = 1..T-1, and the top-``k`` alternatives at
        each of those positions: float64 values [T-1, k] and int ids [T-1, k] (k = 0 gives empty arrays).
        The block is right-padded to a power-of-two bucket (padding after the tokens changes nothing: attention
        is causal).
        """
        n = len(tokens)
        t = bucket_length(n, max(self.max_length, n), MIN_BUCKET)
        block = np.zeros((1, t), np.int32)
        block[0, :n] = tokens
        kk = max(k, 1)
        chosen, values, ids = self._score(self.engine.params, jnp.asarray(block), kk)
        chosen = np.asarray(chosen, np.float64)[: n - 1]
        values = np.asarray(values, np.float64)[: n - 1, :k]
        ids = np.asarray(ids)[: n - 1, :k]
        return chosen, values, ids

    # ------------------------------------------------------------------ worker
    def _empty_state(self) -> DecodeState:
        b, length = self.max_batch, self.max_length
        stops = sorted(self.stop_ids) or [-1]
        if self.pool is not None:
            cache = new_paged_cache(self.engine, b, self.pool.num_pages, self.pool.page_size, self.pages_per_row)
        else:
            cache = self.engine.new_cache(b, length)
        return DecodeState(
            cache=cache,
            last_token=jnp.zeros((b,), jnp.int32),
            tokens=jnp.zeros((b, length), jnp.int32),
            logprobs=jnp.zeros((b, length), jnp.float32),
            num_generated=jnp.zeros((b,), jnp.int32),
            done=jnp.ones((b,), bool),
            max_new=jnp.ones((b,), jnp.int32),
            stop_ids=jnp.asarray(stops, jnp.int32),
            temperature=jnp.zeros((b,), jnp.float32),
            top_k=jnp.zeros((b,), jnp.int32),
            top_p=jnp.ones((b,), jnp.float32),
            min_p=jnp.zeros((b,), jnp.float32),
            key=jax.random.key(self.seed),
            step=jnp.int32(0),
        )

    def _mode(self, extra: Request | None = None) -> SamplingMode:
        reqs = [r for r in self._rows if r is not None] + ([extra] if extra is not None else [])
        if not reqs:
            return SamplingMode()
        p = [r.params for r in reqs]
        return SamplingMode.of(
            [x.temperature for x in p], [x.top_k for x in p], [x.top_p for x in p], [x.min_p for x in p]
        )

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as e:  # noqa: BLE001 - fail every request instead of hanging its client
            traceback.print_exc()
            with self._cond:
                self._stopping = True
                reqs = [r for r in self._rows if r is not None] + list(self._waiting)
                self._rows = [None] * self.max_batch
                self._waiting.clear()
            for r in reqs:
                r._send(Event("error", error=f"internal error in the scheduler: {type(e).__name__}: {e}"))

    def _loop(self) -> None:
        ds = self._empty_state()
        emitted = [0] * self.max_batch
        while True:
            admit: list[tuple[int, Request]] = []
            score_only: list[Request] = []
            with self._cond:
                while True:
                    self._drop_cancelled()
                    active = any(r is not None for r in self._rows)
                    if self._stopping and self._deadline is not None and time.perf_counter() > self._deadline:
                        for row, r in enumerate(self._rows):
                            if r is not None:
                                r._send(Event("error", error="the server shut down before the request finished"))
                                self._rows[row] = None
                                self._release_row(row)
                        active = False
                    if self._stopping and not active:
                        return
                    if active or self._waiting:
                        break
                    self._cond.wait()
                while self._waiting and (None in self._rows or self._waiting[0].params.max_tokens == 0):
                    r = self._waiting[0]
                    if r.params.max_tokens == 0:
                        score_only.append(self._waiting.popleft())
                        continue
                    row = self._rows.index(None)
                    if self.pool is not None and not self._admit_pages(row, r):
                        break  # not enough KV pages now: the request waits for a running one to end
                    self._waiting.popleft()
                    self._rows[row] = r
                    admit.append((row, r))
            freed = [row for row in range(self.max_batch) if self._rows[row] is None]
            if freed:
                done = np.asarray(ds.done)
                if not done[freed].all():  # a cancelled row: stop it on the device
                    done = done.copy()
                    done[freed] = True
                    ds = ds.replace(done=jnp.asarray(done))
            for r in score_only:
                self._finish(r, "length")
            for row, r in admit:
                p = r.params
                if p.seed is not None:
                    ds = ds.replace(key=jax.random.key(p.seed))
                if self.pool is not None:
                    ds, hit = self._insert_paged(ds, row, r)
                elif self.prefix_cache is None:
                    ds = self.engine.insert(
                        ds,
                        row,
                        r.prompt,
                        max_new_tokens=p.max_tokens,
                        temperature=p.temperature,
                        top_k=p.top_k,
                        top_p=p.top_p,
                        min_p=p.min_p,
                        mode=self._mode(),
                    )
                    hit = 0
                else:
                    ds, hit = self._insert_with_prefix(ds, row, r)
                emitted[row] = 0
                with self._cond:
                    self._stats["prompt_tokens_prefilled"] += len(r.prompt) - hit
                    self._stats["prefix_cache_hit_tokens"] += hit
            if admit:
                ds = self._collect(ds, emitted)
            if any(r is not None for r in self._rows):
                if self.pool is not None:
                    ds = self._grow_pages(ds, emitted)
                ds = self.engine.steps(ds, self.steps_per_dispatch, self._mode())
                ds = self._collect(ds, emitted)

    def _insert_with_prefix(self, ds: DecodeState, row: int, r: Request) -> tuple[DecodeState, int]:
        """Engine.insert with the prompt's cached full pages loaded instead of computed: only the rest of the
        prompt is prefilled (chunks starting at the first uncached position); its new full pages are stored.
        Returns the state and the number of prompt tokens taken from the cache."""
        eng, pc, p = self.engine, self.prefix_cache, r.params
        pages = pc.match(r.prompt)
        start = len(pages) * pc.page_size
        cache = pc.load(pages, self.max_length) if pages else eng.new_cache(1, self.max_length)
        n = len(r.prompt)
        rest = n - start
        chunk = bucket_length(rest, eng.chunk_size)
        padded = -(-rest // chunk) * chunk
        block = np.zeros((1, padded), np.int32)
        block[0, :rest] = r.prompt[start:]
        logits = jnp.zeros((1, eng.config.vocab_size), jnp.float32)
        last_index = jnp.asarray([n - 1], jnp.int32)
        for s in range(0, padded, chunk):
            cache, logits = eng._prefill_chunk(
                eng.params, cache, jnp.asarray(block[:, s : s + chunk]), jnp.int32(start + s), last_index, logits
            )
        cache = cache.replace(lengths=jnp.asarray([n], jnp.int32))
        pc.store(r.prompt, cache, pages)
        ds = eng._insert(
            ds,
            jnp.int32(row),
            cache,
            logits,
            *_row_settings(p),
            self._mode(),
        )
        return ds, start

    # ------------------------------------------------------------------ paged KV cache (worker thread only)
    def _admit_pages(self, row: int, r: Request) -> bool:
        """Promises ``r`` the pages of its whole length (prompt + max_tokens) if they fit, taking its shared
        prefix pages into ``row``'s page table; False (nothing changed) when they do not fit now."""
        pool = self.pool
        got = pool.admit(r.prompt, pool.pages_for(len(r.prompt) + r.params.max_tokens))
        if got is None:
            return False
        matched, own = got
        self._row_pages[row] = list(matched)
        self._row_promise[row] = own
        return True

    def _take_pages(self, row: int, count: int) -> None:
        """Allocates pages for ``row`` until it holds ``count`` (within its promise) and writes its page table."""
        pages = self._row_pages[row]
        while len(pages) < count and self._row_promise[row] > 0:
            pages.append(self.pool.allocate())
            self._row_promise[row] -= 1
        self._table[row, : len(pages)] = pages

    def _release_row(self, row: int) -> None:
        """(lock held or worker thread) Returns ``row``'s pages to the pool; its page table becomes unused."""
        if self.pool is None:
            return
        self.pool.release(self._row_pages[row], self._row_promise[row])
        self._row_pages[row], self._row_promise[row] = [], 0
        self._table[row] = self.pool.num_pages

    def _insert_paged(self, ds: DecodeState, row: int, r: Request) -> tuple[DecodeState, int]:
        """Prefills ``r``'s prompt into its own pages of the pool (after its shared prefix pages, which are not
        recomputed) through the row's page table, indexes its new full prompt pages, and starts the row.
        Returns the state and the number of prompt tokens taken from shared pages."""
        p, n = r.params, len(r.prompt)
        start = len(self._row_pages[row]) * self.pool.page_size
        self._take_pages(row, self.pool.pages_for(n))
        view = ds.cache.replace(
            page_table=jnp.asarray(self._table[row : row + 1]), lengths=jnp.asarray([start], jnp.int32)
        )
        view, logits = prefill_paged(self.engine, view, r.prompt, start)
        self.pool.register(r.prompt, self._row_pages[row])
        ds = ds.replace(cache=ds.cache.replace(k_pages=view.k_pages, v_pages=view.v_pages))
        ds = insert_paged(
            ds,
            jnp.int32(row),
            jnp.int32(n),
            logits,
            *_row_settings(p),
            self._mode(),
        )
        return ds, start

    def _grow_pages(self, ds: DecodeState, emitted: list[int]) -> DecodeState:
        """Before a dispatch: every running row gets the pages the next ``steps_per_dispatch`` positions cross
        into (a row at length t writes positions t..t+steps-1), and the device page table is updated."""
        for row, r in enumerate(self._rows):
            if r is not None:
                length = len(r.prompt) + max(emitted[row], 1) - 1
                self._take_pages(row, self.pool.pages_for(length + self.steps_per_dispatch))
        return ds.replace(cache=ds.cache.replace(page_table=jnp.asarray(self._table)))

    def _drop_cancelled(self) -> None:
        """(lock held) Frees the rows and queue places of cancelled requests."""
        for row, r in enumerate(self._rows):
            if r is not None and r.cancelled:
                self._rows[row] = None
                self._release_row(row)
                self._stats["cancelled"] += 1
                r._send(Event("done", result=self._result(r, "cancelled")))
        if any(r.cancelled for r in self._waiting):
            for r in [r for r in self._waiting if r.cancelled]:
                self._stats["cancelled"] += 1
                r._send(Event("done", result=self._result(r, "cancelled")))
            self._waiting = collections.deque(r for r in self._waiting if not r.cancelled)

    def _collect(self, ds: DecodeState, emitted: list[int]) -> DecodeState:
        """Streams the new tokens of every row, applies stop strings, finishes done rows."""
        counts = np.asarray(ds.num_generated)
        done = np.asarray(ds.done).copy()
        rows = [row for row, r in enumerate(self._rows) if r is not None and not r.cancelled]
        if not rows:
            return ds
        lo = min(emitted[row] for row in rows)
        hi = max(int(counts[row]) for row in rows)
        tokens = np.asarray(ds.tokens[:, lo:hi]) if hi > lo else None
        logprobs = np.asarray(ds.logprobs[:, lo:hi]) if hi > lo else None
        stop_now = []
        for row in rows:
            r = self._rows[row]
            new = range(emitted[row], int(counts[row]))
            if len(new):
                if r.first_token_time is None:
                    r.first_token_time = time.perf_counter()
                ids = [int(tokens[row, j - lo]) for j in new]
                lps = [float(logprobs[row, j - lo]) for j in new]
                r.tokens += ids
                r.logprobs += lps
                emitted[row] = int(counts[row])
                text, hit = self._text(r)
                delta = text[len(r.sent_text) :] if text.startswith(r.sent_text) else ""
                r.sent_text += delta
                r._send(Event("token", text=delta, token_ids=tuple(ids), logprobs=tuple(lps)))
                if hit:
                    stop_now.append(row)
                    continue
            if done[row]:
                stop_now.append(row)
        if not stop_now:
            return ds
        for row in stop_now:
            r = self._rows[row]
            last = r.tokens[-1] if r.tokens else None
            _, hit = self._text(r)
            reason = "stop" if hit or last in self.stop_ids else "length"
            with self._cond:
                self._rows[row] = None
                self._release_row(row)
            self._finish(r, reason)
            done[row] = True
        return ds.replace(done=jnp.asarray(done))

    def _text(self, r: Request, final: bool = False) -> tuple[str, bool]:
        """(text safe to show, stop string hit). Without a hit and unless ``final``, the last characters that
        could start a stop string and an incomplete UTF-8 sequence are held back."""
        body = r.tokens[:-1] if r.tokens and r.tokens[-1] in self.stop_ids else r.tokens
        text = self.tokenizer.decode(body)
        cut = min((i for i in (text.find(s) for s in r.params.stop) if i >= 0), default=-1)
        if cut >= 0:
            return text[:cut], True
        if final:
            return text, False
        hold = max((len(s) - 1 for s in r.params.stop), default=0)
        if hold:
            # keep back a suffix that is a prefix of some stop string
            for k in range(min(hold, len(text)), 0, -1):
                if any(s.startswith(text[-k:]) for s in r.params.stop):
                    text = text[:-k]
                    break
        while text.endswith("\ufffd"):
            text = text[:-1]
        return text, False

    def _result(self, r: Request, reason: str) -> Result:
        text, hit = self._text(r, final=True)
        now = time.perf_counter()
        timing = {"total": now - r.submitted}
        if r.first_token_time is not None:
            timing["ttft"] = r.first_token_time - r.submitted
        return Result(list(r.prompt), list(r.tokens), list(r.logprobs), text, reason, timing=timing)

    def _finish(self, r: Request, reason: str) -> None:
        result = self._result(r, reason)
        p = r.params
        if p.echo or p.logprobs:
            seq = r.prompt + r.tokens
            k = p.logprobs or 0
            if len(seq) >= 2:
                chosen, values, ids = self.score(seq, k)
            else:
                chosen, values, ids = np.zeros((0,)), np.zeros((0, k)), np.zeros((0, k), np.int64)
            n = len(r.prompt)
            if p.echo:
                result.prompt_logprobs = [None] + chosen[: n - 1].tolist()
            if k:
                top = [list(zip(ids[t].tolist(), values[t].tolist(), strict=True)) for t in range(len(seq) - 1)]
                result.top_logprobs = ([None] + top[: n - 1] if p.echo else []) + top[n - 1 :]
        with self._cond:
            self._stats["finished"] += 1
            self._stats["tokens_generated"] += len(r.tokens)
        r.finished = True
        r._send(Event("done", result=result))


class PrefixCache:
    """Full pages of prompt prefixes computed once and shared by later requests (vLLM's automatic prefix caching;
    SGLang's RadixAttention, Zheng et al. 2024, section 3).

    A pool of ``num_pages`` pages of ``page_size`` tokens per layer (:func:`llama_jax.kv_cache.init_paged_cache`)
    holds the keys/values of full pages; page i of a prompt is found by the key (id of page i-1, its
    ``page_size`` token ids), so a page is only ever shared by prompts whose whole prefix up to it is identical.
    Pages are reference-counted while a request uses them and kept afterwards; when the pool is full the least
    recently used page with no reference is evicted (with the pages that continue it). Used from the scheduler's
    worker thread only.
    """

    def __init__(self, engine: Engine, num_pages: int, page_size: int = 16):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"num_pages and page_size must be >= 1, got {num_pages}, {page_size}")
        self.page_size, self.num_pages = page_size, num_pages
        pool = init_paged_cache(engine.config, num_pages, page_size, 1, 1, engine.model.dtype)
        self.k_pages, self.v_pages = pool.k_pages, pool.v_pages
        self._key_of: dict[int, tuple] = {}  # page -> (parent page or -1, token block)
        self._page_of: dict[tuple, int] = {}
        self._children: dict[int, set[int]] = collections.defaultdict(set)
        self._refs = collections.Counter()
        self._lru: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached pages, oldest first
        self._free = list(range(num_pages))[::-1]
        self.hits = self.misses = 0

        def load(k_pages, v_pages, table, length: int):
            k = gather_pages(k_pages, table[None])[:, :, :length]  # [L, 1, S, K, H]
            v = gather_pages(v_pages, table[None])[:, :, :length]
            return KVCache(k=k, v=v, lengths=jnp.zeros((1,), jnp.int32))

        def save(k_pages, v_pages, cache, dest, src):
            """Copies page ``src[i]`` of the 1-row cache into pool page ``dest[i]`` (dest = N: skipped)."""
            p = k_pages.shape[2]
            s = cache.k.shape[2] // p * p
            kb = cache.k[:, 0, :s].reshape(cache.k.shape[0], -1, p, *cache.k.shape[3:])  # [L, S/P, P, K, H]
            vb = cache.v[:, 0, :s].reshape(cache.v.shape[0], -1, p, *cache.v.shape[3:])
            return (
                scatter_set(k_pages, (slice(None), dest), kb[:, src]),
                scatter_set(v_pages, (slice(None), dest), vb[:, src]),
            )

        self._load = jax.jit(load, static_argnames=("length",))
        self._save = jax.jit(save, donate_argnames=("k_pages", "v_pages"))

    def match(self, prompt: Sequence[int]) -> list[int]:
        """Pool pages of the longest cached run of full pages at the start of ``prompt`` (leaving at least one
        token to prefill), most recently used now; their references are taken until :meth:`store`."""
        p, pages, parent = self.page_size, [], -1
        for i in range((len(prompt) - 1) // p):
            page = self._page_of.get((parent, tuple(prompt[i * p : (i + 1) * p])))
            if page is None:
                break
            pages.append(page)
            parent = page
        for page in pages:
            self._refs[page] += 1
            self._lru.move_to_end(page)
        self.hits += bool(pages)
        self.misses += not pages
        return pages

    def load(self, pages: list[int], length: int) -> KVCache:
        """A 1-row dense cache of ``length`` slots whose first len(pages) * page_size slots hold the pages."""
        m = -(-length // self.page_size)
        table = np.zeros((m,), np.int32)
        table[: len(pages)] = pages
        return self._load(self.k_pages, self.v_pages, jnp.asarray(table), length)

    def store(self, prompt: Sequence[int], cache: KVCache, matched: list[int]) -> None:
        """Stores the full pages of ``prompt`` after the ``matched`` ones from the prefilled 1-row ``cache``,
        then drops the references :meth:`match` took."""
        p = self.page_size
        full = min(len(prompt), cache.max_length) // p
        parent = matched[-1] if matched else -1
        dest, src = [], []
        protected = set(matched)
        for i in range(len(matched), full):
            key = (parent, tuple(prompt[i * p : (i + 1) * p]))
            page = self._page_of.get(key)
            if page is None:
                page = self._allocate(protected)
                if page is None:
                    break
                self._key_of[page] = key
                self._page_of[key] = page
                self._children[parent].add(page)
                dest.append(page)
                src.append(i)
            self._lru[page] = None
            self._lru.move_to_end(page)
            protected.add(page)
            parent = page
        if dest:
            m = cache.max_length // p
            d = np.full((m,), self.num_pages, np.int32)
            sidx = np.zeros((m,), np.int32)
            d[: len(dest)], sidx[: len(src)] = dest, src
            self.k_pages, self.v_pages = self._save(
                self.k_pages, self.v_pages, cache, jnp.asarray(d), jnp.asarray(sidx)
            )
        for page in matched:
            self._refs[page] -= 1

    def _allocate(self, protected: set[int]) -> int | None:
        if not self._free:
            for page in list(self._lru):
                if self._refs[page] == 0 and page not in protected:
                    self._evict(page)
                    break
        return self._free.pop() if self._free else None

    def _evict(self, page: int) -> None:
        for child in list(self._children.pop(page, ())):
            self._evict(child)
        key = self._key_of.pop(page)
        del self._page_of[key]
        self._children[key[0]].discard(page)
        self._lru.pop(page, None)
        self._free.append(page)

    def stats(self) -> dict:
        return {
            "pages": self.num_pages,
            "pages_cached": len(self._key_of),
            "page_size": self.page_size,
            "hits": self.hits,
            "misses": self.misses,
        }


class PagePool:
    """The host-side allocator of a paged KV cache's page pool, with the prefix cache's index of shared pages.

    Pages are numbered 0..num_pages-1 (the device pool is :func:`llama_jax.kv_cache.init_paged_cache`'s; this
    class only decides which row holds which page). Design (vLLM's block manager, Kwon et al. 2023, SOSP,
    section 4.2; SGLang's RadixAttention, Zheng et al. 2024, section 3, for the shared prefix pages):

    * **Admission by reservation.** A request of n prompt tokens and up to ``max_tokens`` new ones will hold at
      most R = ceil((n + max_tokens) / P) pages; it is admitted (:meth:`admit`) only when the pages it does not
      share (R minus its prefix-cache hits) fit into the pages free or evictable now, less the pages already
      promised to the running rows. So a row can always get its next page and never takes another row's: a
      request that does not fit waits. Pages are still *allocated* one at a time (:meth:`allocate`), when the
      row's tokens cross a page edge; until then they stay free (or hold evictable prefix pages).
    * **Reference counts.** Every page a row's page table names holds one reference for that row. A row returns
      its pages when it ends or is cancelled (:meth:`release`): a page with no reference goes back to the free
      list, unless it is an indexed prefix page, which stays cached (evictable) until space is needed.
    * **Prefix pages** (``cache_pages > 0``): the full pages of a prompt are indexed by (parent page, their P
      token ids) (:meth:`register`), so page i is shared only by prompts whose whole prefix up to it is the same.
      A later prompt's matching pages (:meth:`admit`) are put into its page table by reference, never copied;
      they are never written again (a row writes only positions past its prompt's full pages, on its own pages).
      At most ``cache_pages`` pages are indexed; beyond, and when the free list is empty, the least recently used
      indexed page with no reference is evicted (with the pages that continue it).

    Used from the scheduler's worker thread only.
    """

    def __init__(self, num_pages: int, page_size: int, cache_pages: int = 0):
        if num_pages < 1 or page_size < 1 or cache_pages < 0:
            raise ValueError(
                f"num_pages and page_size must be >= 1 and cache_pages >= 0, got {num_pages}, {page_size}, "
                f"{cache_pages}"
            )
        self.num_pages, self.page_size, self.cache_pages = num_pages, page_size, cache_pages
        self._free = list(range(num_pages))[::-1]
        self._refs = collections.Counter()
        self._reserved = 0  # pages promised to admitted rows, not yet allocated
        self._key_of: dict[int, tuple] = {}  # indexed page -> (parent page or -1, token block)
        self._page_of: dict[tuple, int] = {}
        self._children: dict[int, set[int]] = collections.defaultdict(set)
        self._lru: collections.OrderedDict[int, None] = collections.OrderedDict()  # indexed pages, oldest first
        self.hits = self.misses = 0

    def pages_for(self, tokens: int) -> int:
        """Pages that ``tokens`` positions take: ceil(tokens / P)."""
        return -(-tokens // self.page_size)

    def _evictable(self) -> int:
        return sum(1 for page in self._key_of if self._refs[page] == 0)

    def available(self) -> int:
        """Pages a new request may still be promised: free + evictable - already promised."""
        return len(self._free) + self._evictable() - self._reserved

    def admit(self, prompt: Sequence[int], total_pages: int) -> tuple[list[int], int] | None:
        """Admits a request that will hold ``total_pages`` pages: returns (its shared prefix pages, referenced now,
        and the number of its own pages promised to it), or None when they do not fit now (nothing changes)."""
        matched = self._match(prompt) if self.cache_pages else []
        for page in matched:
            self._refs[page] += 1
        own = total_pages - len(matched)
        if own > self.available():
            for page in matched:
                self._refs[page] -= 1
            return None
        for page in matched:
            self._lru.move_to_end(page)
        self._reserved += own
        if self.cache_pages:
            self.hits += bool(matched)
            self.misses += not matched
        return matched, own

    def allocate(self) -> int:
        """One promised page for a row (referenced once): a free page, else the least recently used evictable
        prefix page. Raises RuntimeError if none (admission makes that impossible)."""
        if not self._free:
            for page in list(self._lru):
                if self._refs[page] == 0:
                    self._evict(page)
                    break
        if not self._free or self._reserved < 1:
            raise RuntimeError("page pool exhausted: a row asked for a page it was not promised")
        self._reserved -= 1
        page = self._free.pop()
        self._refs[page] += 1
        return page

    def release(self, pages: Sequence[int], unused_promise: int) -> None:
        """A row ends: drops its reference on each of ``pages`` and the ``unused_promise`` pages it never took."""
        self._reserved -= unused_promise
        for page in pages:
            self._refs[page] -= 1
            if self._refs[page] == 0:
                del self._refs[page]
                if page not in self._key_of:
                    self._free.append(page)

    def register(self, prompt: Sequence[int], pages: Sequence[int]) -> None:
        """Indexes the full pages of ``prompt`` (``pages``: the row's page table, prompt pages first) that are not
        indexed yet. Stops at a page whose key another page already has (its continuation must hang off the row's
        own chain) and when the index is full and nothing is evictable."""
        if not self.cache_pages:
            return
        p, parent = self.page_size, -1
        for i in range(len(prompt) // p):
            key = (parent, tuple(prompt[i * p : (i + 1) * p]))
            page = self._page_of.get(key)
            if page is None:
                if len(self._key_of) >= self.cache_pages and not self._evict_one():
                    return
                page = pages[i]
                self._key_of[page] = key
                self._page_of[key] = page
                self._children[parent].add(page)
            elif page != pages[i]:
                return
            self._lru[page] = None
            self._lru.move_to_end(page)
            parent = page

    def _match(self, prompt: Sequence[int]) -> list[int]:
        """Indexed pages of the longest run of full pages at the start of ``prompt``, leaving >= 1 token to
        prefill (its logits start decoding)."""
        p, pages, parent = self.page_size, [], -1
        for i in range((len(prompt) - 1) // p):
            page = self._page_of.get((parent, tuple(prompt[i * p : (i + 1) * p])))
            if page is None:
                break
            pages.append(page)
            parent = page
        return pages

    def _evict_one(self) -> bool:
        for page in list(self._lru):
            if self._refs[page] == 0:
                self._evict(page)
                return True
        return False

    def _evict(self, page: int) -> None:
        """Drops ``page`` (and the pages continuing it) from the index; those without a reference become free."""
        for child in list(self._children.pop(page, ())):
            self._evict(child)
        key = self._key_of.pop(page)
        del self._page_of[key]
        self._children[key[0]].discard(page)
        self._lru.pop(page, None)
        if self._refs[page] == 0:
            self._refs.pop(page, None)
            self._free.append(page)

    def stats(self) -> dict:
        """total / free / in use (referenced by a row) / cached (indexed prefix pages) / promised pages."""
        return {
            "total": self.num_pages,
            "free": len(self._free),
            "in_use": sum(1 for c in self._refs.values() if c > 0),
            "cached": len(self._key_of),
            "promised": self._reserved,
            "page_size": self.page_size,
        }

    def prefix_stats(self) -> dict:
        """The prefix cache's figures, as :meth:`PrefixCache.stats`."""
        return {
            "pages": self.cache_pages,
            "pages_cached": len(self._key_of),
            "page_size": self.page_size,
            "hits": self.hits,
            "misses": self.misses,
        }
