"""Token sampling as pure, jit-friendly functions: greedy, temperature, top-k, top-p, min-p.

Every function takes float32 logits of shape [B, V] (B rows of a batch, V vocabulary entries) and
is safe to call inside `jax.jit` / `jax.lax.while_loop`: nothing branches in Python on array
values. Each sampling parameter may be a Python scalar (one setting for the whole batch) or an
array of shape [B] (one setting per row), so one compiled decode step serves requests with
different settings.

Filters, in the order they are applied (the order of Hugging Face transformers'
`TemperatureLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper`, `MinPLogitsWarper`):

1. temperature: logits / temperature. temperature <= 0 means greedy: only the argmax survives
      (first index on ties) and nothing is divided by zero.
2. top-k: keep the k most probable tokens (ties broken by the lower index); k = 0 disables it.
3. top-p, nucleus sampling (Holtzman et al. 2019, "The Curious Case of Neural Text
      Degeneration", arXiv:1904.09751, section 3.1): keep the smallest set of most probable tokens
      whose total probability (renormalised after top-k) is >= p. p = 1 keeps every token with
      non-zero probability. A cumulative sum that reaches p within `_TOP_P_TOLERANCE` counts as
      reaching it, so probabilities 0.5 + 0.3 meet p = 0.8 despite float32 rounding.
4. min-p (Nguyen et al. 2024, "Turning Up the Heat: Min-p Sampling for Creative and Coherent
      LLM Outputs", arXiv:2407.01082): keep tokens with probability >= min_p * (max probability);
      min_p = 0 disables it.

Cost: top-k and top-p need the rank order, found without a sort (XLA's sort takes about 1 s for
[32, 49152] on CPU) by bisecting for the cut-off logit, about 70 [B, V] passes, and skipped at run
time when no row uses them; greedy, temperature and min-p are a few [B, V] passes.

The most probable token always survives any combination, so a row is never left empty.
Tokens whose logit is -inf (probability zero) are never drawn.

Parameter checking for user input (the CLI) is `validate_sampling`; the traced functions cannot
raise on array values, so they treat temperature <= 0 as greedy, top_k <= 0 as disabled,
top_p >= 1 as disabled and min_p <= 0 as disabled.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["filter_logits", "sample", "greedy", "log_probs", "validate_sampling"]

# Absolute slack on the cumulative probability when testing it against top_p (float32 sums).
_TOP_P_TOLERANCE = 1e-6


def _row_param(x, dtype) -> jax.Array:
    """A scalar or [B] parameter as an array that broadcasts against [B, V] ([1] or [B, 1])."""
    return jnp.asarray(x, dtype=dtype)[..., None]


def _is_static(x, disabled_when) -> bool:
    """True when `x` is a concrete Python / NumPy scalar for which the filter is a no-op."""
    if isinstance(x, (numbers.Number, np.number)) and not isinstance(x, jax.Array):
        return bool(disabled_when(x))
    return False


def _order_key(x: jax.Array) -> jax.Array:
    """int32 keys with the same order as the float32 values `x` (-inf lowest; -0.0 == 0.0; no NaN)."""
    x = jnp.where(x == 0, 0.0, x.astype(jnp.float32))  # -0.0 and 0.0 tie as floats: one key
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _bisect(pred, key: jax.Array) -> jax.Array:
    """Smallest int32 c in [min(key) - 1, max(key)] with pred(c), per row ([B, 1]).

    `pred` maps [B, 1] int32 to [B, 1] bool and must be monotone (False then True); the answer is
    max(key) where pred never holds below it. 32 halvings cover the whole int32 range.
    """
    lo = jnp.min(key, axis=-1, keepdims=True)  # pred(lo - 1) may hold: answer lo - 1 is allowed
    lo = jnp.where(lo == jnp.iinfo(jnp.int32).min, lo, lo - 1)
    hi = jnp.max(key, axis=-1, keepdims=True)

    def step(_, bounds):
        lo, hi = bounds
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
        ok = pred(mid)
        active = lo < hi
        return jnp.where(active & ~ok, mid + 1, lo), jnp.where(active & ok, mid, hi)

    _, hi = jax.lax.fori_loop(0, 33, step, (lo, hi))
    return hi


def filter_logits(
    logits: jax.Array,
    *,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    min_p=0.0,
) -> jax.Array:
    """Scale logits by temperature and set the tokens excluded by top-k / top-p / min-p to -inf.

    Args:
        logits: float [B, V] next-token logits (computed in float32).
        temperature: float scalar or float [B]; <= 0 selects greedy for that row (only the argmax,
            first index on ties, survives; its logit is left unscaled, so there is no division by zero).
        top_k: int scalar or int [B]; keep the k most probable tokens (ties broken by lower index);
            0 disables.
        top_p: float scalar or float [B] in (0, 1]; nucleus sampling (arXiv:1904.09751): keep the
            smallest set of most probable tokens whose probability, renormalised after top-k, sums to
            >= top_p; 1.0 disables (every token with non-zero probability is kept).
        min_p: float scalar or float [B] in [0, 1]; keep tokens with probability >= min_p times the
            largest probability (arXiv:2407.01082); 0 disables.

    Returns:
        float32 [B, V]: temperature-scaled logits, -inf where a token is excluded. The argmax of
        `logits` is never excluded, so every row keeps at least one token.

    Raises:
        ValueError: if `logits` is not 2-D. Out-of-range parameter values are not checked here (see
            `validate_sampling`).
    """
    logits = jnp.asarray(logits, dtype=jnp.float32)
    if logits.ndim != 2:
        raise ValueError(f"filter_logits: logits must be [B, V], got shape {logits.shape}")
    _, vocab = logits.shape

    t = _row_param(temperature, jnp.float32)  # [1] or [B, 1]
    is_greedy = t <= 0.0
    z = logits / jnp.where(is_greedy, 1.0, t)  # [B, V]

    iota = jax.lax.broadcasted_iota(jnp.int32, z.shape, 1)  # [B, V]
    top1 = iota == jnp.argmax(z, axis=-1, keepdims=True)  # [B, V] the argmax, first on ties
    keep = jnp.logical_not(jnp.broadcast_to(is_greedy, z.shape))  # greedy rows keep only top1

    skip_top_k = _is_static(top_k, lambda k: k <= 0 or k >= vocab)
    skip_top_p = _is_static(top_p, lambda p: p >= 1.0)
    if not (skip_top_k and skip_top_p):
        k = _row_param(0 if skip_top_k else top_k, jnp.int32)  # [1] or [B, 1]
        p = _row_param(1.0 if skip_top_p else top_p, jnp.float32)
        needs_rank = jnp.logical_not(is_greedy) & (((k > 0) & (k < vocab)) | (p < 1.0))

        def ranked_mask(z):
            # The rank order is "larger logit first, lower index first among ties" (a stable
            # descending sort). XLA's sort is slow on CPU, so instead each cut-off logit is found
            # by bisection on the float32 bit patterns (32 steps of [B, V] reductions), then ties
            # at the cut-off are resolved by index with a cumulative sum.
            key = _order_key(z)  # [B, V] int32, same order as z

            # top-k: smallest cut c with #(key > c) < k; keep key > c, and the first ties at c.
            def count_above(c):
                return jnp.sum(key > c, axis=-1, keepdims=True, dtype=jnp.int32)

            cut = _bisect(lambda c: count_above(c) < k, key)
            tied = key == cut
            tie_rank = jnp.cumsum(tied, axis=-1, dtype=jnp.int32) - 1
            in_top_k = (key > cut) | (tied & (tie_rank < k - count_above(cut)))
            keep_k = jnp.where((k > 0) & (k < vocab), in_top_k, True)
            # top-p on the distribution renormalised over the top-k tokens.
            probs = jax.nn.softmax(jnp.where(keep_k, z, -jnp.inf), axis=-1)  # [B, V]
            target = p - _TOP_P_TOLERANCE

            def mass_above(c):
                return jnp.sum(jnp.where(key > c, probs, 0.0), axis=-1, keepdims=True)

            cut = _bisect(lambda c: mass_above(c) < target, key)
            tied_probs = jnp.where(key == cut, probs, 0.0)
            mass_before = mass_above(cut) + jnp.cumsum(tied_probs, axis=-1) - tied_probs
            in_nucleus = (key > cut) | ((key == cut) & (mass_before < target))
            return keep_k & ((p >= 1.0) | in_nucleus)

        # The bisections cost about 64 [B, V] reductions: skip them at run time when no row uses
        # top-k or top-p (greedy rows never need them).
        keep &= jax.lax.cond(jnp.any(needs_rank), ranked_mask, lambda z: jnp.ones(z.shape, dtype=bool), z)

    if not _is_static(min_p, lambda m: m <= 0.0):
        m = _row_param(min_p, jnp.float32)
        # prob >= min_p * max_prob  <=>  z - max(z) >= log(min_p); log(0) = -inf keeps everything.
        log_m = jnp.log(jnp.maximum(m, 0.0))
        keep &= (z - jnp.max(z, axis=-1, keepdims=True)) >= log_m

    keep |= top1
    return jnp.where(keep, z, -jnp.inf)


def greedy(logits: jax.Array) -> jax.Array:
    """The most probable token of each row.

    Args:
        logits: float [B, V].

    Returns:
        int32 [B]: argmax over V, the first index on ties.
    """
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def sample(
    logits: jax.Array,
    key: jax.Array,
    *,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    min_p=0.0,
) -> jax.Array:
    """Draw one token per row from the filtered distribution (see `filter_logits`).

    Args:
        logits: float [B, V] next-token logits.
        key: a PRNG key (`jax.random.key(seed)` or legacy uint32 [2]); it is split into one key per
            row, so rows draw independently. Alternatively a batch of B keys (typed [B] or uint32
            [B, 2]), one per row, e.g. one per request. The same key gives the same tokens every run.
        temperature, top_k, top_p, min_p: as in `filter_logits`, Python scalars or [B] arrays.
            A row with temperature <= 0 returns `greedy` (argmax, first index on ties).

    Returns:
        int32 [B] token ids.

    Raises:
        ValueError: if `logits` is not 2-D or `key` has an unexpected shape.
    """
    logits = jnp.asarray(logits, dtype=jnp.float32)
    filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    batch = logits.shape[0]
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        single = key.ndim == 0
    else:
        single = key.ndim == 1
    if single:
        keys = jax.random.split(key, batch)
    else:
        keys = key
    if keys.shape[0] != batch:
        raise ValueError(f"sample: key must be one PRNG key or {batch} keys (one per row), got shape {key.shape}")
    is_greedy = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32) <= 0.0, (batch,))

    def draw(filtered):
        # Gumbel-max: argmax(logits + Gumbel noise) is a draw from softmax(logits); one noise
        # vector per row from that row's key.
        noise = jax.vmap(lambda k: jax.random.gumbel(k, filtered.shape[1:], jnp.float32))(keys)
        return jnp.argmax(filtered + noise, axis=-1).astype(jnp.int32)  # [B]

    # Drawing the noise costs more than the argmax on CPU: skip it when every row is greedy.
    drawn = jax.lax.cond(jnp.all(is_greedy), lambda f: jnp.zeros((batch,), jnp.int32), draw, filtered)
    return jnp.where(is_greedy, greedy(logits), drawn).astype(jnp.int32)


def log_probs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Log-probability of the chosen tokens under the unfiltered model distribution.

    This is log-softmax of the raw float32 logits (no temperature, no top-k/top-p/min-p), the
    figure reported to users alongside generated tokens.

    Args:
        logits: float [B, V].
        tokens: int [B] chosen token ids.

    Returns:
        float32 [B].
    """
    logp = jax.nn.log_softmax(jnp.asarray(logits, dtype=jnp.float32), axis=-1)  # [B, V]
    tokens = jnp.asarray(tokens, dtype=jnp.int32)
    return jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


def validate_sampling(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> None:
    """Check user-given sampling settings (scalars or host arrays) before they reach a jitted step.

    Args:
        temperature: >= 0 (0 means greedy).
        top_k: integer >= 0 (0 disables).
        top_p: in (0, 1] (1 disables).
        min_p: in [0, 1] (0 disables).

    Raises:
        ValueError: naming the offending parameter (`temperature`, `top_k`, `top_p` or `min_p`) when a
            value is out of range, not finite, or (top_k) not an integer.
    """

    def arr(name, x):
        try:
            return np.asarray(x, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name} must be a number, got {x!r}") from e

    t = arr("temperature", temperature)
    if not np.all(np.isfinite(t) & (t >= 0)):
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature!r}")
    k = arr("top_k", top_k)
    if not np.all(np.isfinite(k) & (k >= 0) & (k == np.floor(k))):
        raise ValueError(f"top_k must be an integer >= 0 (0 disables), got {top_k!r}")
    p = arr("top_p", top_p)
    if not np.all((p > 0) & (p <= 1)):
        raise ValueError(f"top_p must be in (0, 1] (1 disables), got {top_p!r}")
    m = arr("min_p", min_p)
    if not np.all((m >= 0) & (m <= 1)):
        raise ValueError(f"min_p must be in [0, 1] (0 disables), got {min_p!r}")
