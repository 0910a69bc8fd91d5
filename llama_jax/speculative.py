"""Speculative decoding: a cheap proposer guesses k tokens, the target model checks them in one cached pass.

Sources: Leviathan, Kalman & Matias, "Fast Inference from Transformers via Speculative Decoding"
(arXiv:2211.17192, algorithm 1 and section 3.5); Chen et al., "Accelerating Large Language Model Decoding with
Speculative Sampling" (arXiv:2302.01318, algorithm 2); prompt lookup decoding (Saxena 2023, n-gram matching
against the input, as in transformers' ``prompt_lookup_num_tokens``).

One round, for every row b of the batch (B rows, k proposed tokens, V vocabulary entries):

1. **Propose** k tokens d_1..d_k after the row's last token x (and, for a draft model, the draft's filtered
   distributions q_1..q_k [V]). Proposers: :class:`PromptLookup` (host-side n-gram match, deterministic:
   q_i is one-hot) and :class:`DraftModel` (another Llama with the same vocabulary: a smaller model, the same
   checkpoint with int8 weights, or its first N layers, :func:`first_layers`).
2. **Verify** (one jitted target forward of the T = k+1 tokens [x, d_1..d_k] at positions len..len+k over the
   KV cache; :mod:`llama_jax.attention` lets each query read only slots <= its own position, so this is
   exactly k+1 decode steps' logits). p_i = the target's distribution after the sampling filters
   (:func:`llama_jax.sampling.filter_logits`: temperature, top-k, top-p, min-p), applied to q as well.
3. **Accept**. Greedy rows: the longest prefix with d_i = argmax p_i, then argmax at the first mismatch (the
   correction) or after d_k (the bonus): the tokens plain greedy decoding gives. Sampling rows: d_i is accepted
   with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection a token is drawn from
   norm(max(0, p_i - q_i)), after k acceptances the bonus from p_{k+1}: every emitted token is distributed
   exactly as the target's filtered distribution (arXiv:2211.17192 appendix A.1).
4. **Roll back** by length only: the cache row's length becomes len + 1 + accepted; the K/V written for
   rejected tokens stay in their slots, masked by position and overwritten next round (:mod:`llama_jax.kv_cache`).
   Rows accept different numbers of tokens; finished rows keep their length.

Stop ids, stop strings, ``max_new_tokens`` and log-probabilities (of the unfiltered target distribution) behave
as in :meth:`llama_jax.engine.Engine.generate`; a round's tokens are emitted one by one through the same checks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax import sampling
from llama_jax.engine import Completion, Engine, SamplingMode, _completion
from llama_jax.kv_cache import init_cache
from llama_jax.model import Llama

__all__ = [
    "PromptLookup",
    "DraftModel",
    "first_layers",
    "self_draft",
    "accept",
    "generate",
    "SPECULATIVE_MODES",
]

SPECULATIVE_MODES = ("prompt_lookup", "draft")


# ------------------------------------------------------------------------------------------- proposers
@dataclasses.dataclass(frozen=True)
class PromptLookup:
    """Prompt lookup: proposes the tokens that followed the most recent earlier occurrence of the last n tokens
    of prompt + generated text (n = ``ngram`` down to 2, the longest n that matches wins). No second model.

    A match of n tokens proposes min(k, n - 1) of the tokens after it (k = ``num_speculative``): a text copied
    from the input tends to go on being copied the longer it already has been, and a 1-token match, a guess
    that was wrong at its first token ~3 times in 4 on SmolLM2 summaries, proposes nothing (a plain decode
    step). Each proposed token costs ~0.1-0.15 of a decode step to verify on the 2-core CPU. On the
    extractive-summary task of experiments/bench_speculative.py a replay of SmolLM2's greedy output gave 1.58x
    with this rule against 1.53x for a fixed k on n >= 3 (1.14x against 1.05x on the abstractive task).

    Raises ValueError for ``ngram`` < 2 or ``num_speculative`` < 1 (named).
    """

    ngram: int = 8
    num_speculative: int = 4

    def __post_init__(self):
        if self.ngram < 2:
            raise ValueError(f"ngram must be >= 2 (a match of n tokens proposes n - 1), got {self.ngram}")
        if self.num_speculative < 1:
            raise ValueError(f"num_speculative must be >= 1, got {self.num_speculative}")

    def propose(self, seq: Sequence[int]) -> tuple[list[int], int]:
        """The proposed tokens after ``seq`` (token ids; none without a match of 2 or more tokens) and how many
        of them come from the match (fewer when the match is near the end: the rest repeat the last token, a
        filler the target verifies like any other guess)."""
        arr = np.asarray(seq, np.int64)
        for n in range(min(self.ngram, len(arr) - 1), 1, -1):
            windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)  # [len-n, n]: arr[j:j+n], j+n < len
            hits = np.nonzero((windows == arr[-n:]).all(axis=1))[0]
            if hits.size:
                m = min(self.num_speculative, n - 1)
                j = int(hits[-1]) + n
                cont = arr[j : j + m].tolist()
                return cont + [int(arr[-1])] * (m - len(cont)), len(cont)
        return [], 0


class DraftModel:
    """A draft Llama proposing k tokens by decoding k steps from its own KV cache.

    Args:
      model: a :class:`llama_jax.Llama` with the target's vocabulary (a smaller Llama, :func:`self_draft`).
      num_speculative: k >= 1.
      kv_dtype: the storage dtype of the draft's own KV cache (one of :data:`llama_jax.kv_cache.KV_DTYPES`;
        None: the draft model's dtype). Default bfloat16: a draft only proposes and the target's verify pass
        keeps the output exact, so its cache can be half the bytes of a float32 one; attention over it is a
        large part of a small draft's step after a long prompt (SmolLM2's int8 self-draft after 1552 tokens on the
        2-core CPU: 17.5 ms a step with a float32 cache, 14.2-15.1 with bfloat16, 14.5-14.7 with int8).

    The draft gets its own :class:`llama_jax.engine.Engine` (made on first use against a target, with the
    target's ``max_length`` and ``chunk_size``; an Engine given as ``model`` is used as it is, its cache
    included). Raises ValueError for k < 1 or an unknown ``kv_dtype``.
    """

    def __init__(self, model: Llama | Engine, num_speculative: int = 4, kv_dtype="bfloat16"):
        if num_speculative < 1:
            raise ValueError(f"num_speculative must be >= 1, got {num_speculative}")
        if kv_dtype is not None:
            init_cache(model.config, 1, 1, kv_dtype=kv_dtype)  # validates the name (ValueError naming kv_dtype)
        self.kv_dtype = kv_dtype
        self.model = model.model if isinstance(model, Engine) else model
        self._engine = model if isinstance(model, Engine) else None
        self.num_speculative = num_speculative
        self._propose = None

    def check(self, target: Engine) -> None:
        """Raises ValueError unless the draft's vocabulary size equals the target's."""
        dv, tv = self.model.config.vocab_size, target.config.vocab_size
        if dv != tv:
            raise ValueError(
                f"draft model vocabulary ({dv} tokens) differs from the target's ({tv} tokens): "
                "a draft must share the target's tokenizer"
            )

    def engine(self, target: Engine) -> Engine:
        self.check(target)
        if self._engine is None or self._engine.max_length < target.max_length:
            self._engine = Engine(
                self.model, max_length=target.max_length, chunk_size=target.chunk_size, kv_dtype=self.kv_dtype
            )
            self._propose = None
        if self._propose is None:
            self._propose = _jit_on_leaves(
                _draft_propose,
                self._engine.graphdef,
                static_argnames=("mode", "k"),
                compiler_options=self._engine.loop_compiler_options or None,  # a loop of draft steps
            )
        return self._engine

    def propose(self, cache, prev_token, last_token, key, settings, mode: SamplingMode, k: int | None = None):
        """(cache, tokens int32 [B, k], q float32 [B, k, V] or None when greedy) from the draft's cache
        (k defaults to ``num_speculative``).

        ``cache.lengths`` [B] is the position of ``prev_token`` [B], the token before ``last_token`` [B]: the first
        draft step takes both (a 2-token chunk), so the draft's K/V of the token before the row's last one is
        (re)written whether or not the previous round accepted every proposal, and k draft forwards give k
        proposals (k + 1 would be needed to write the K/V of the k-th proposal after the fact)."""
        k = k or self.num_speculative
        return self._propose(self._engine.params, cache, prev_token, last_token, key, *settings, mode=mode, k=k)


def _filtered(logits, temperature, top_k, top_p, min_p, mode: SamplingMode):
    """filter_logits with the filters of ``mode`` only (static, as the engine's _emit)."""
    return sampling.filter_logits(
        logits,
        temperature=temperature,
        top_k=top_k if mode.top_k else 0,
        top_p=top_p if mode.top_p else 1.0,
        min_p=min_p if mode.min_p else 0.0,
    )


def _draft_propose(graphdef, params, cache, prev_token, last_token, key, temperature, top_k, top_p, min_p, *, mode, k):
    """k draft forwards from [prev, x] (cache lengths = prev's position): proposals d_1..d_k and their filtered
    distributions q [B, k, V]. The first forward is the 2-token chunk [prev, x] (prev's K/V rewritten with the
    same values when it is already there, written when the last round accepted all k proposals), then d_1 ..
    d_{k-1} one at a time."""
    model = nnx.merge(graphdef, params)
    b = last_token.shape[0]
    v = model.config.vocab_size
    drafts = jnp.zeros((b, k), jnp.int32)
    qs = None if mode.greedy else jnp.zeros((b, k, v), jnp.float32)

    def emit(i, logits, drafts, qs, key):  # logits [B, V] -> proposal i
        if mode.greedy:
            nxt = sampling.greedy(logits)
        else:
            key, sub = jax.random.split(key)
            f = _filtered(logits, temperature, top_k, top_p, min_p, mode)
            nxt = jax.random.categorical(sub, f, axis=-1).astype(jnp.int32)
            nxt = jnp.where(temperature <= 0, sampling.greedy(logits), nxt)
            qs = jax.lax.dynamic_update_index_in_dim(qs, jax.nn.softmax(f, axis=-1), i, 1)
        drafts = jax.lax.dynamic_update_index_in_dim(drafts, nxt, i, 1)
        return nxt, drafts, qs, key

    logits, cache = model(jnp.stack([prev_token, last_token], axis=1), kv_cache=cache)  # [B, 2, V]
    tok, drafts, qs, key = emit(0, logits[:, -1], drafts, qs, key)

    def body(i, carry):
        cache, tok, drafts, qs, key = carry
        logits, cache = model(tok[:, None], kv_cache=cache)
        tok, drafts, qs, key = emit(i, logits[:, 0], drafts, qs, key)
        return cache, tok, drafts, qs, key

    cache, _, drafts, qs, _ = jax.lax.fori_loop(1, k, body, (cache, tok, drafts, qs, key))
    return cache, drafts, qs


def first_layers(model: Llama, n: int) -> Llama:
    """A self-draft: ``model`` cut to its first ``n`` decoder layers (same embeddings, final norm and head).
    ``model`` itself becomes that draft (load a second copy for it). Raises ValueError unless 1 <= n < L."""
    layers = model.config.n_layers
    if not 1 <= n < layers:
        raise ValueError(f"draft_layers must be in [1, {layers - 1}] (the model has {layers} layers), got {n}")
    model.unstack_layers()
    model.layers = nnx.List(list(model.layers)[:n])
    model.config = dataclasses.replace(model.config, n_layers=n)
    return model


def self_draft(checkpoint: str, *, quant: str = "none", layers: int | None = None, dtype=None) -> Llama:
    """Loads ``checkpoint`` again as a draft for itself: with int8 weights (``quant="int8"``) and/or only its
    first ``layers`` decoder layers. Raises ValueError as :func:`llama_jax.quant.load` / :func:`first_layers`."""
    from llama_jax import quant as q

    model = q.load(checkpoint, quant=quant, dtype=dtype)
    return model if layers is None else first_layers(model, layers)


# ------------------------------------------------------------------------------------------- verify + accept
def accept(logits, drafts, q, key, temperature, top_k, top_p, min_p, mode: SamplingMode):
    """The acceptance rule on the target's logits [B, k+1, V] for proposals ``drafts`` int32 [B, k].

    ``q``: float32 [B, k, V] the proposer's (filtered) distributions, or None for a deterministic proposer
    (one-hot at the proposal). Sampling settings are [B] arrays; ``mode`` is static (all-greedy: no random
    numbers, argmax comparisons only).

    Returns (tokens int32 [B, k+1], accepted int32 [B]): tokens[:, :n] = the accepted proposals and
    tokens[:, n] = the correction (first rejection) or bonus (n = k) token, n = accepted; later entries are junk.
    Source: arXiv:2211.17192 algorithm 1; arXiv:2302.01318 algorithm 2.
    """
    b, t, v = logits.shape
    k = t - 1
    rows = jnp.arange(b)
    if mode.greedy:
        target = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, k+1]
        n = jnp.sum(jnp.cumprod(drafts == target[:, :k], axis=1), axis=1).astype(jnp.int32)
        return target, n
    rep = lambda x: jnp.repeat(jnp.broadcast_to(jnp.asarray(x), (b,)), t)  # noqa: E731  [B] -> [B*(k+1)] (row-major)
    f = _filtered(logits.reshape(b * t, v), rep(temperature), rep(top_k), rep(top_p), rep(min_p), mode)  # [B*(k+1), V]
    p = jax.nn.softmax(f, axis=-1).reshape(b, t, v)  # [B, k+1, V] target's filtered distributions
    if q is None:
        q = jax.nn.one_hot(drafts, v, dtype=jnp.float32)  # [B, k, V]
    p_d = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]  # [B, k]
    q_d = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]  # [B, k]
    k_u, k_r = jax.random.split(key)
    u = jax.random.uniform(k_u, (b, k), jnp.float32)  # [0, 1)
    ok = u * q_d < p_d  # P(ok) = min(1, p/q)
    n = jnp.sum(jnp.cumprod(ok, axis=1), axis=1).astype(jnp.int32)  # [B]
    q_ext = jnp.concatenate([q, jnp.zeros((b, 1, v), jnp.float32)], axis=1)  # [B, k+1, V]: q = 0 after d_k
    p_n, q_n = p[rows, n], q_ext[rows, n]  # [B, V]
    residual = jnp.maximum(p_n - q_n, 0.0)
    residual = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, p_n)  # p == q: never rejected
    fix = jax.random.categorical(k_r, jnp.log(residual), axis=-1).astype(jnp.int32)  # [B]
    tokens = jnp.concatenate([drafts, jnp.zeros((b, 1), jnp.int32)], axis=1).at[rows, n].set(fix)
    return tokens, n


def _verify(graphdef, params, cache, last_token, drafts, q, done, key, temperature, top_k, top_p, min_p, *, mode):
    """Target forward of [x, d_1..d_k] over the cache, acceptance, rollback by length.

    Returns (cache, tokens int32 [B, k+1], logprobs float32 [B, k+1] (unfiltered target), accepted int32 [B])."""
    model = nnx.merge(graphdef, params)
    old = cache.lengths
    seq = jnp.concatenate([last_token[:, None], drafts], axis=1)  # [B, k+1]
    logits, cache = model(seq, kv_cache=cache)  # [B, k+1, V] at positions len..len+k
    tokens, n = accept(logits, drafts, q, key, temperature, top_k, top_p, min_p, mode)
    logp = jax.nn.log_softmax(logits, axis=-1)
    logprobs = jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]  # [B, k+1]
    lengths = jnp.where(done, old, old + 1 + n)  # rollback: rejected slots are beyond the length
    return cache.replace(lengths=lengths), tokens, logprobs, n


# ------------------------------------------------------------------------------------------- generation
def _draft_for(engine: Engine, model) -> DraftModel:
    """The DraftModel for a Llama / Engine, kept on the target engine so its compilations are reused."""
    drafts = engine.__dict__.setdefault("_speculative_drafts", {})
    if id(model) not in drafts:
        drafts[id(model)] = (model, DraftModel(model))  # the model is held so its id stays unique
    return drafts[id(model)][1]


def _jit_on_leaves(fn, graphdef, *, static_argnames, compiler_options=None):
    """``jax.jit`` of ``fn(graphdef, params, cache, *args, **kwargs)`` (``cache`` donated, ``static_argnames``
    among the keyword arguments) that takes ``params``, an ``nnx.State``, as its flat list of arrays.

    A speculative round dispatches one or two such calls from Python and waits for their tokens before the next
    round can be proposed, so dispatch time is decode time: jit's dispatch of the ~270-leaf ``nnx.State`` of
    SmolLM2 took 2.4-3.5 ms a call on the 2-core CPU (a tenth of a decode step), of the same list of leaves with
    the same tree structure object ~1.0 ms (a freshly flattened one: 2-5 ms). So the leaves are taken once per
    ``params`` object (the engine's are not changed in place)."""

    def on_leaves(treedef, leaves, cache, *args, **kwargs):
        return fn(graphdef, jax.tree_util.tree_unflatten(treedef, leaves), cache, *args, **kwargs)

    jitted = jax.jit(
        on_leaves,
        static_argnums=(0,),
        donate_argnums=(2,),
        static_argnames=static_argnames,
        compiler_options=compiler_options,
    )

    flat = {}  # the last params object seen -> its leaves and tree structure

    def call(params, cache, *args, **kwargs):
        if flat.get("params") is not params:
            flat["leaves"], flat["treedef"] = jax.tree_util.tree_flatten(params)
            flat["params"] = params
        return jitted(flat["treedef"], flat["leaves"], cache, *args, **kwargs)

    return call


def _verifier(engine: Engine):
    fn = getattr(engine, "_speculative_verify", None)
    if fn is None:
        fn = _jit_on_leaves(_verify, engine.graphdef, static_argnames=("mode",))
        engine._speculative_verify = fn
    return fn


def generate(
    engine: Engine,
    prompts: Sequence[Sequence[int]],
    *,
    speculative: str = "prompt_lookup",
    draft: DraftModel | Llama | Engine | None = None,
    num_speculative: int = 4,
    ngram: int = 8,
    max_new_tokens: int = 256,
    temperature=0.0,
    top_k=0,
    top_p=1.0,
    min_p=0.0,
    seed: int = 0,
    stop_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    tokenizer=None,
    stream: bool = False,
):
    """Speculative generation with ``engine``'s model as the target; arguments as :meth:`Engine.generate`.

    Args:
      speculative: "prompt_lookup" (:class:`PromptLookup` with ``ngram``) or "draft" (``draft``: a
        :class:`DraftModel`, a Llama or an Engine with the target's vocabulary).
      num_speculative: k, tokens proposed per round (>= 1).

    Returns the list of :class:`llama_jax.engine.Completion` (one per prompt, ``speculative`` holding the row's
    ``{"proposed", "accepted", "rounds", "acceptance_rate"}``), or with ``stream=True`` an iterator of
    ``(row, token, logprob)`` ending with that list. Greedy tokens equal plain greedy decoding's; sampled
    tokens follow the same distribution (not the same draws).

    Raises ValueError: unknown ``speculative``, missing draft, another vocabulary, k < 1 or ngram < 2, and what
    :meth:`Engine.generate` raises.
    """
    if speculative not in SPECULATIVE_MODES:
        raise ValueError(f"speculative must be one of {SPECULATIVE_MODES}, got {speculative!r}")
    if num_speculative < 1:
        raise ValueError(f"num_speculative must be >= 1, got {num_speculative}")
    lookup = None
    if speculative == "prompt_lookup":
        lookup = PromptLookup(ngram=ngram, num_speculative=num_speculative)
    else:
        if draft is None:
            raise ValueError('speculative="draft" needs a draft model (draft=...)')
        if not isinstance(draft, DraftModel):
            draft = _draft_for(engine, draft)
        draft.check(engine)
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings needs a tokenizer")
    stops = set(stop_ids)
    if tokenizer is not None:
        stops |= set(getattr(tokenizer, "stop_ids", ()))
    it = _run(
        engine, prompts, lookup, draft, num_speculative, max_new_tokens, (temperature, top_k, top_p, min_p), seed,
        sorted(stops), stop_strings, tokenizer,
    )  # fmt: skip
    if stream:
        return it
    out = None
    for item in it:
        out = item
    return out


def _run(engine, prompts, lookup, draft, k, max_new_tokens, settings, seed, stops, stop_strings, tokenizer) -> Iterator:
    n = len(prompts)
    ds = engine.start(
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=settings[0],
        top_k=settings[1],
        top_p=settings[2],
        min_p=settings[3],
        seed=seed,
        stop_ids=stops,
        extra_slots=k + 1,
    )
    mode = engine.mode(ds)
    row_settings = (ds.temperature, ds.top_k, ds.top_p, ds.min_p)
    cache, key = ds.cache, ds.key
    stop_set = set(stops)
    first = np.asarray(ds.tokens[:, 0])
    first_lp = np.asarray(ds.logprobs[:, 0])
    toks = [[int(first[r])] for r in range(n)]
    lps = [[float(first_lp[r])] for r in range(n)]
    done = np.asarray(ds.done)[:n].copy()
    proposed = np.zeros(n, np.int64)
    accepted = np.zeros(n, np.int64)
    rounds = np.zeros(n, np.int64)
    del ds

    def finished(r) -> bool:
        if toks[r][-1] in stop_set or len(toks[r]) >= max_new_tokens:
            return True
        if stop_strings:
            text = tokenizer.decode(toks[r])
            return any(s in text for s in stop_strings)
        return False

    if draft is not None:  # the draft's prefill is part of the prefill: before the first token is out
        d_engine = draft.engine(engine)
        d_cache = d_engine.new_cache(n, cache.max_length)
        d_cache, _ = d_engine.prefill(prompts, d_cache)
        jax.block_until_ready(d_cache)  # done here, not inside the first round (dispatch is asynchronous)
    for r in range(n):
        yield r, toks[r][0], lps[r][0]
        done[r] = done[r] or finished(r)

    verify = _verifier(engine)
    while not done.all():
        last = jnp.asarray(np.asarray([t[-1] for t in toks], np.int32))
        key, k_draft, k_accept = jax.random.split(key, 3)
        if draft is not None:
            prev = jnp.asarray(np.asarray([(list(prompts[r]) + t)[-2] for r, t in enumerate(toks)], np.int32))
            d_cache = d_cache.replace(lengths=d_cache.lengths - 1)  # the position of prev
            d_cache, drafts, q = draft.propose(d_cache, prev, last, k_draft, row_settings, mode, k)
        else:
            q = None
            guesses = [[] for _ in range(n)]
            for r in range(n):
                if not done[r]:
                    guess, matched = lookup.propose(list(prompts[r]) + toks[r])
                    guesses[r] = guess if matched else []
            # rows pad to the longest guess with their last token; no guess at all: a plain decode step (a verify
            # pass of one token). Widths come from a few values (k / 2^j, 0), so a few compilations.
            width = max(len(g) for g in guesses)
            drafts = np.zeros((n, width), np.int32)
            for r, g in enumerate(guesses):
                drafts[r] = g + [toks[r][-1]] * (width - len(g))
            drafts = jnp.asarray(drafts)
        cache, out, out_lp, acc = verify(
            engine.params, cache, last, drafts, q, jnp.asarray(done), k_accept, *row_settings, mode=mode
        )
        if draft is not None:
            d_cache = d_cache.replace(lengths=jnp.copy(cache.lengths))  # its own buffer: both caches are donated
        out, out_lp, acc = np.asarray(out), np.asarray(out_lp), np.asarray(acc)
        for r in np.nonzero(~done)[0]:
            rounds[r] += 1
            proposed[r] += drafts.shape[1]
            accepted[r] += acc[r]
            for j in range(acc[r] + 1):
                toks[r].append(int(out[r, j]))
                lps[r].append(float(out_lp[r, j]))
                yield int(r), int(out[r, j]), float(out_lp[r, j])
                if finished(r):
                    done[r] = True
                    break
    results = []
    for r in range(n):
        c = _completion(prompts[r], toks[r], lps[r], stop_set, stop_strings, tokenizer)
        c.speculative = {
            "proposed": int(proposed[r]),
            "accepted": int(accepted[r]),
            "rounds": int(rounds[r]),
            "acceptance_rate": float(accepted[r] / proposed[r]) if proposed[r] else 0.0,
        }
        results.append(c)
    yield results


def acceptance_rate(completions: Sequence[Completion]) -> float:
    """Accepted / proposed tokens over ``completions`` from :func:`generate` (0 when nothing was proposed)."""
    prop = sum(c.speculative["proposed"] for c in completions if c.speculative)
    acc = sum(c.speculative["accepted"] for c in completions if c.speculative)
    return acc / prop if prop else 0.0
