"""The inference hot path: jitted prefill and decode over an explicit KV cache.

Design (ARCHITECTURE.md; gemma's ``_sampler_loop.py``):

* **Prefill** (:meth:`Engine.prefill`): prompts are right-padded into one [B, T] block whose length T is a
  bucket (a power of two from 16 up to the chunk size), so the number of compilations stays bounded. Each row's
  positions start at 0 at its first real token and its tokens go to cache slots = positions (see
  :mod:`llama_jax.kv_cache`): a padded row never changes another row's result. Prompts longer than a chunk are
  prefilled chunk by chunk into the same cache. The logits at each row's last real token seed decoding.
* **Decode** is a pure step on a :class:`DecodeState` pytree (cache, last tokens, output buffers, per-row
  sampling settings, done flags, RNG key). :meth:`Engine.generate` runs it as a device loop
  (``jax.lax.while_loop``, one dispatch for the whole generation) or, with ``stream=True``, as a host loop over
  the *same* step that yields tokens as they come.
* **Continuous batching** (:meth:`Engine.generate_continuous`): when a row finishes, :meth:`Engine.insert`
  prefills the next prompt into a 1-row cache and scatters it into that row of the running state (K/V of all
  layers, length, output buffers, first token); decoding continues ``steps_per_dispatch`` steps per device call.
* Int8 weights (:mod:`llama_jax.quant`) need nothing here: the model multiplies int8 weights into its products
  (:func:`llama_jax.model.project`) and scales the results.
* Every jitted call donates the cache (``donate_argnames``), so the cache is updated in place.
* Generation stops per row on a stop id (the model's, e.g. Llama 3.1 instruct's 128001/128008/128009, united
  with the caller's), on a stop string (checked on the host), or after ``max_new_tokens``; per-token
  log-probabilities (of the unfiltered distribution) are returned.
* On CPU the decoder layers are switched to the unstacked layout (a Python loop over per-layer weights) and
  matmul weights to the "out_in" layout (contracted axis last; float32 ones where :mod:`llama_jax.cpu_kernels`
  is built), chosen in :func:`decode_layout`: XLA:CPU reads a stacked weight slice inside a scan at about half the
  bandwidth, and reads bf16/int8 weights in place only when they are contracted on their last axis
  (ARCHITECTURE.md).
* A persistent XLA compilation cache (``~/.cache/llama_jax/xla`` or ``$LLAMA_JAX_COMPILATION_CACHE``; set it to
  an empty string to disable) is switched on when an Engine is made, so a second run does not compile again.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax import cpu_kernels, sampling
from llama_jax.kv_cache import KVCache, init_cache, scatter_set
from llama_jax.model import Llama

#: Stop ids of Llama 3.1 instruct models: end_of_text, eom_id, eot_id.
LLAMA31_STOP_IDS = (128001, 128008, 128009)
MIN_BUCKET = 16


def enable_compilation_cache(path: str | None = None) -> str | None:
    """Turns on JAX's persistent compilation cache (idempotent). Returns the directory, or None if disabled."""
    if path is None:
        path = os.environ.get(
            "LLAMA_JAX_COMPILATION_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "llama_jax", "xla")
        )
    if not path:
        return None
    if jax.config.jax_compilation_cache_dir != path:
        os.makedirs(path, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", path)
        # every program, however fast it compiled: a time threshold makes what is cached depend on how loaded the
        # machine was (a program compiled in 0.19 s by one run and 0.21 s by the next is written only the second time)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def weight_storage_dtype(model: Llama) -> jnp.dtype:
    """The dtype matmul weights are stored in: int8 for llama_jax.quant weights, else the parameter dtype."""
    value = next(model._matmul_params())[1].get_value()
    return jnp.dtype(jnp.int8) if hasattr(value, "q") else jnp.dtype(value.dtype)


#: XLA options of a decode loop over bfloat16/int8 weights on CPU (see :func:`decode_layout`).
NO_HOISTED_WEIGHT_CASTS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


def decode_layout(weight_dtype=jnp.float32, backend: str | None = None) -> dict:
    """The parameter layout the engine decodes with, for weights stored as ``weight_dtype`` on ``backend``
    (default: JAX's default backend).

    The one place this choice is made. The checkpoint (stacked layers, "in_out" weights), the logical axis names
    and the sharding rules stay as they are; the engine transforms the model in place at construction.

    * "cpu": unstacked layers (XLA:CPU reads a layer slice of a stacked weight inside a scan at about half the
      bandwidth). bfloat16 and int8 weights "out_in" (contracted axis last): XLA:CPU then streams them into the
      matrix-vector product as stored; "in_out" makes it write a float32 copy of every weight first (measured
      13x slower). float32 weights are "out_in" too where :mod:`llama_jax.cpu_kernels` is built: its few-row
      product reads them at the bandwidth XLA's float32 dot reaches for one row, and is 1.3-3x faster than either
      layout's XLA dot for 2-16 rows (a small batch, a speculative verify pass); more rows (prefill) take XLA's
      dot, which is as fast in either layout there. Without the kernels float32 stays "in_out" (XLA's
      float32 matrix-vector product, measured up to 1.5x faster than its "out_in" form).
      bfloat16 and int8 weights also compile the decode loops without XLA's while-loop invariant code motion
      (``compiler_options``): the cast of a weight to the compute dtype does not change from step to step, so that
      pass hoists it out of ``Engine.loop`` / ``Engine.steps`` and writes a float32 copy of every weight before the
      loop (the whole model, once per call), and the loop then reads the copy, at float32 cost. Measured on
      SmolLM2-135M, batch 1: int8 decode 30 -> 46 tok/s, bf16 27 -> 37 tok/s.
    * other backends: ``{"unstack": False, "weight_layout": "in_out", "compiler_options": {}}`` (scanned layers).

    Returns a dict: ``unstack`` (bool), ``weight_layout`` ("in_out" or "out_in"), ``compiler_options`` (the XLA
    options of the jitted decode loops, a dict for ``jax.jit(..., compiler_options=...)``).
    """
    if (backend or jax.default_backend()) == "cpu":
        if jnp.dtype(weight_dtype) == jnp.float32:
            # the kernels serve one-device CPU runs only (a mesh keeps XLA's dot, fastest on "in_out")
            layout = "out_in" if cpu_kernels.available() and jax.device_count() == 1 else "in_out"
            return {"unstack": True, "weight_layout": layout, "compiler_options": {}}
        return {"unstack": True, "weight_layout": "out_in", "compiler_options": dict(NO_HOISTED_WEIGHT_CASTS)}
    return {"unstack": False, "weight_layout": "in_out", "compiler_options": {}}


def bucket_length(n: int, maximum: int, minimum: int = MIN_BUCKET) -> int:
    """Smallest power of two >= n (and >= ``minimum``), capped at ``maximum``."""
    b = minimum
    while b < n:
        b *= 2
    return min(b, maximum)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """Everything one decode step reads and writes (B rows, M = max new tokens)."""

    cache: KVCache
    last_token: jax.Array  # int32 [B]   token fed to the next step
    tokens: jax.Array  # int32 [B, M] generated tokens (pad after a row is done)
    logprobs: jax.Array  # float32 [B, M] their log-probabilities
    num_generated: jax.Array  # int32 [B]
    done: jax.Array  # bool [B]
    max_new: jax.Array  # int32 [B]   per-row budget
    stop_ids: jax.Array  # int32 [S]
    temperature: jax.Array  # float32 [B]
    top_k: jax.Array  # int32 [B]
    top_p: jax.Array  # float32 [B]
    min_p: jax.Array  # float32 [B]
    key: jax.Array  # PRNG key
    step: jax.Array  # int32 []

    def replace(self, **changes) -> DecodeState:
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass
class Completion:
    """One prompt's result. ``finish_reason`` is "stop" (stop id or string) or "length"."""

    prompt_tokens: list[int]
    tokens: list[int]
    logprobs: list[float]
    finish_reason: str
    text: str | None = None
    #: speculative decoding only (:mod:`llama_jax.speculative`): proposed / accepted tokens, rounds, rate
    speculative: dict | None = None


@dataclasses.dataclass(frozen=True)
class SamplingMode:
    """Which sampling filters any row uses: static, so unused filters cost nothing in the compiled step."""

    greedy: bool = True
    top_k: bool = False
    top_p: bool = False
    min_p: bool = False

    @classmethod
    def of(cls, temperature, top_k, top_p, min_p) -> SamplingMode:
        if np.all(np.asarray(temperature) <= 0):
            return cls()
        return cls(
            greedy=False,
            top_k=bool(np.any(np.asarray(top_k) > 0)),
            top_p=bool(np.any(np.asarray(top_p) < 1)),
            min_p=bool(np.any(np.asarray(min_p) > 0)),
        )


def _emit(ds: DecodeState, logits: jax.Array, mode: SamplingMode) -> DecodeState:
    """Samples the next token of every row from float32 ``logits`` [B, V] and records it."""
    key, sub = jax.random.split(ds.key)
    if mode.greedy:
        token = sampling.greedy(logits)  # [B]
    else:
        token = sampling.sample(
            logits,
            sub,
            temperature=ds.temperature,
            top_k=ds.top_k if mode.top_k else 0,
            top_p=ds.top_p if mode.top_p else 1.0,
            min_p=ds.min_p if mode.min_p else 0.0,
        )  # [B]
    logprob = sampling.log_probs(logits, token)  # [B]
    active = ~ds.done
    rows = jnp.arange(token.shape[0])
    index = jnp.where(active, ds.num_generated, ds.tokens.shape[1])  # out of range: dropped
    tokens = ds.tokens.at[rows, index].set(token, mode="drop")
    logprobs = ds.logprobs.at[rows, index].set(logprob, mode="drop")
    num_generated = ds.num_generated + active.astype(jnp.int32)
    hit_stop = jnp.isin(token, ds.stop_ids)
    done = ds.done | (active & (hit_stop | (num_generated >= ds.max_new)))
    return ds.replace(
        last_token=token,
        tokens=tokens,
        logprobs=logprobs,
        num_generated=num_generated,
        done=done,
        key=key,
        step=ds.step + 1,
    )


def _insert_row(
    ds: DecodeState,
    row: jax.Array,
    cache: KVCache,
    logits: jax.Array,
    max_new: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    min_p: jax.Array,
    mode: SamplingMode,
) -> DecodeState:
    """Puts a prefilled 1-row ``cache`` (its float32 ``logits`` [1, V] at the last prompt token) into row ``row``
    of ``ds``: K/V of every layer and the length are copied, the row's outputs and settings reset, and its first
    token sampled (other rows unchanged)."""
    slots = {
        name: scatter_set(getattr(ds.cache, name), (slice(None), row), getattr(cache, name)[:, 0])
        for name in _SLOT_ARRAYS
        if getattr(ds.cache, name) is not None
    }
    lengths = ds.cache.lengths.at[row].set(cache.lengths[0])
    new_cache = ds.cache.replace(lengths=lengths, **slots)
    return _start_row(ds, row, new_cache, logits, max_new, temperature, top_k, top_p, min_p, mode)


def _start_row(ds, row, new_cache, logits, max_new, temperature, top_k, top_p, min_p, mode) -> DecodeState:
    """``ds`` with cache ``new_cache`` and row ``row`` restarted: outputs cleared, settings set (scalars), and its
    first token sampled from float32 ``logits`` [1, V] (other rows unchanged). Shared by the dense and paged
    row inserts."""
    m = ds.tokens.shape[1]
    one = DecodeState(
        cache=None,
        last_token=jnp.zeros((1,), jnp.int32),
        tokens=jnp.zeros((1, m), jnp.int32),
        logprobs=jnp.zeros((1, m), jnp.float32),
        num_generated=jnp.zeros((1,), jnp.int32),
        done=jnp.zeros((1,), bool),
        max_new=max_new[None],
        stop_ids=ds.stop_ids,
        temperature=temperature[None],
        top_k=top_k[None],
        top_p=top_p[None],
        min_p=min_p[None],
        key=ds.key,
        step=ds.step,
    )
    one = _emit(one, logits, mode)
    put = lambda full, part: full.at[row].set(part[0])  # noqa: E731
    return ds.replace(
        cache=new_cache, key=one.key, **{name: put(getattr(ds, name), getattr(one, name)) for name in _ROW_FIELDS}
    )


#: DecodeState fields with a batch-row axis that :func:`_start_row` resets for a new request.
_ROW_FIELDS = (
    "last_token",
    "tokens",
    "logprobs",
    "num_generated",
    "done",
    "max_new",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
)


#: KVCache fields with a slot axis (axis 2): K/V [L, B, S, K, H] and the int8 scales [L, B, S, K].
_SLOT_ARRAYS = ("k", "v", "k_scale", "v_scale")


class Engine:
    """Compiled prefill/decode for one model.

    Args:
      model: a :class:`llama_jax.Llama` (its parameters may be sharded over a mesh; the jitted functions follow
        the arrays' shardings).
      max_length: longest sequence (prompt + generation) a cache holds; default the model's ``max_seq_len``.
      chunk_size: longest prefill block; longer prompts are prefilled chunk by chunk.
      unstack: switch the model to per-layer weights (default: on CPU). The model is modified in place
        (same parameters, same results).
      weight_layout: "out_in" (every matmul weight contracted on its last axis; :meth:`llama_jax.model.Llama.
        set_weight_layout`) or "in_out" (the checkpoint's); default :func:`decode_layout` (weights, backend). Changed
        in place, one weight at a time (no second copy of the model).
      mesh: the device mesh the model is sharded over; caches are then created directly in their shards
        (``llama_jax.sharding.init_cache_sharded``: batch over data/fsdp, KV heads over tensor).
      rules: logical-axis rules for the cache (default ``llama_jax.sharding.DEFAULT_RULES``).
      kv_dtype: KV-cache storage dtype (``llama_jax.kv_cache.KV_DTYPES``); default the model's compute dtype.
        "int8" stores int8 K/V with one float32 scale per token and KV head (single device only).

    Raises:
      ValueError: bad chunk_size or kv_dtype, or an int8 cache with a mesh.
    """

    def __init__(
        self,
        model: Llama,
        *,
        max_length: int | None = None,
        chunk_size: int = 512,
        unstack: bool | None = None,
        weight_layout: str | None = None,
        mesh=None,
        rules=None,
        kv_dtype=None,
    ):
        enable_compilation_cache()
        if kv_dtype is not None:
            init_cache(model.config, 1, 1, kv_dtype=kv_dtype)  # validates the name
            if mesh is not None and jnp.dtype(kv_dtype) == jnp.int8:
                raise ValueError(
                    "kv_dtype='int8' is not supported with a mesh yet (the cache sharding has no scale arrays)"
                )
        self.kv_dtype = kv_dtype
        layout = decode_layout(weight_storage_dtype(model))
        if unstack is None:
            unstack = layout["unstack"]
        # the layout first, on the stacked arrays: each stacked weight is transposed whole (a buffer large enough
        # to go back to the OS when freed) and then sliced once; per-layer transposes after the slicing would
        # leave ~200 MB of freed small buffers in the heap for SmolLM2 (peak RSS +0.4x the weights)
        model.set_weight_layout(weight_layout or layout["weight_layout"])
        if unstack:
            model.unstack_layers()
        self.model = model
        self.config = model.config
        self.max_length = min(max_length or self.config.max_seq_len, self.config.max_seq_len)
        if chunk_size < MIN_BUCKET or chunk_size & (chunk_size - 1):
            raise ValueError(f"chunk_size must be a power of two >= {MIN_BUCKET}, got {chunk_size}")
        self.chunk_size = min(chunk_size, bucket_length(self.max_length, 1 << 30))
        self.mesh, self.rules = mesh, rules
        self.graphdef, self.params = nnx.split(model)
        graphdef = self.graphdef

        def prefill_chunk(params, cache, tokens, start, last_index, last_logits):
            """tokens [B, C] at positions start..start+C-1 -> cache, logits at each row's last prompt token."""
            model = nnx.merge(graphdef, params)
            b, c = tokens.shape
            positions = start + jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, c))
            hidden, cache = model(tokens, positions, kv_cache=cache, return_hidden=True)  # [B, C, D]
            offset = last_index - start  # [B]
            in_chunk = (offset >= 0) & (offset < c)
            h = hidden[jnp.arange(b), jnp.clip(offset, 0, c - 1)]  # [B, D]
            logits = model.logits(h[:, None])[:, 0]  # [B, V]
            return cache, jnp.where(in_chunk[:, None], logits, last_logits)

        def decode_step(params, ds: DecodeState, mode: SamplingMode) -> DecodeState:
            model = nnx.merge(graphdef, params)
            logits, cache = model(ds.last_token[:, None], kv_cache=ds.cache)  # [B, 1, V]
            return _emit(ds.replace(cache=cache), logits[:, 0], mode)

        def decode_loop(params, ds: DecodeState, mode: SamplingMode) -> DecodeState:
            steps = ds.tokens.shape[1]
            return jax.lax.while_loop(
                lambda s: (s.step < steps) & ~jnp.all(s.done), lambda s: decode_step(params, s, mode), ds
            )

        def decode_steps(params, ds: DecodeState, mode: SamplingMode, n: int) -> DecodeState:
            return jax.lax.fori_loop(0, n, lambda _, s: decode_step(params, s, mode), ds)

        self._prefill_chunk = jax.jit(prefill_chunk, donate_argnames=("cache", "last_logits"))
        #: XLA options of the programs that loop over decode steps (see :func:`decode_layout`).
        self.loop_compiler_options = layout["compiler_options"]
        loop_options = self.loop_compiler_options or None
        self._decode_steps = jax.jit(
            decode_steps, donate_argnames=("ds",), static_argnames=("mode", "n"), compiler_options=loop_options
        )
        self._insert = jax.jit(_insert_row, donate_argnames=("ds",), static_argnames=("mode",))
        self._first = jax.jit(_emit, donate_argnames=("ds",), static_argnames=("mode",))
        self._decode_step = jax.jit(decode_step, donate_argnames=("ds",), static_argnames=("mode",))
        self._decode_loop = jax.jit(
            decode_loop, donate_argnames=("ds",), static_argnames=("mode",), compiler_options=loop_options
        )

    # ------------------------------------------------------------------ pieces
    def new_cache(self, batch_size: int, length: int) -> KVCache:
        if self.mesh is not None:
            from llama_jax import sharding

            return sharding.init_cache_sharded(self.config, self.mesh, batch_size, length, self.model.dtype, self.rules)
        return init_cache(self.config, batch_size, length, self.model.dtype, kv_dtype=self.kv_dtype)

    def prefill(self, prompts: Sequence[Sequence[int]], cache: KVCache) -> tuple[KVCache, jax.Array]:
        """Writes the prompts into ``cache`` (rows 0..len(prompts)-1; other rows get a 1-token dummy prompt).

        Returns the cache (lengths = prompt lengths) and float32 logits [B, V] at each row's last prompt token.
        Raises ValueError for an empty prompt or one that does not fit in the cache.
        """
        b = cache.batch_size
        lengths = np.ones((b,), np.int32)
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
            if len(p) >= cache.max_length:
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens; the cache holds {cache.max_length} "
                    f"(max_length {self.max_length}) and at least one new token must fit"
                )
            lengths[i] = len(p)
        longest = int(lengths.max())
        chunk = bucket_length(longest, self.chunk_size)
        padded_len = -(-longest // chunk) * chunk
        block = np.zeros((b, padded_len), np.int32)
        for i, p in enumerate(prompts):
            block[i, : len(p)] = p
        last_logits = jnp.zeros((b, self.config.vocab_size), jnp.float32)
        last_index = jnp.asarray(lengths - 1)
        for start in range(0, padded_len, chunk):
            cache, last_logits = self._prefill_chunk(
                self.params,
                cache,
                jnp.asarray(block[:, start : start + chunk]),
                jnp.int32(start),
                last_index,
                last_logits,
            )
        return cache.replace(lengths=jnp.asarray(lengths)), last_logits

    def start(
        self,
        prompts,
        *,
        max_new_tokens: int,
        batch_size: int | None = None,
        temperature=0.0,
        top_k=0,
        top_p=1.0,
        min_p=0.0,
        seed: int = 0,
        stop_ids: Sequence[int] = (),
        extra_slots: int = 0,
    ) -> DecodeState:
        """Prefills the prompts and samples the first new token of each: the state the decode loop continues.

        Sampling settings are scalars or per-prompt sequences. ``batch_size`` pads the batch with dummy rows
        (finished from the start) so that batches of different sizes share one compilation. ``extra_slots``
        cache slots beyond prompt + max_new_tokens are reserved (speculative decoding verifies k+1 tokens ahead).
        """
        n = len(prompts)
        if n == 0:
            raise ValueError("no prompts")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        sampling.validate_sampling(temperature, top_k, top_p, min_p)
        b = max(batch_size or n, n)
        longest = max(len(p) for p in prompts)
        need = longest + max_new_tokens + extra_slots
        if need > self.max_length:
            extra = f" + {extra_slots} speculative slots" if extra_slots else ""
            raise ValueError(
                f"prompt of {longest} tokens + max_new_tokens {max_new_tokens}{extra} = {need} exceeds "
                f"max_length {self.max_length} (the model's context is {self.config.max_seq_len})"
            )
        cache = self.new_cache(b, bucket_length(need, self.max_length))
        cache, logits = self.prefill(prompts, cache)

        def per_row(x, dtype, fill):
            arr = np.full((b,), fill, dtype)
            arr[:n] = np.broadcast_to(np.asarray(x, dtype), (n,))
            return jnp.asarray(arr)

        done = np.zeros((b,), bool)
        done[n:] = True
        stops = sorted(set(int(s) for s in stop_ids)) or [-1]
        ds = DecodeState(
            cache=cache,
            last_token=jnp.zeros((b,), jnp.int32),
            tokens=jnp.zeros((b, max_new_tokens), jnp.int32),
            logprobs=jnp.zeros((b, max_new_tokens), jnp.float32),
            num_generated=jnp.zeros((b,), jnp.int32),
            done=jnp.asarray(done),
            max_new=jnp.full((b,), max_new_tokens, jnp.int32),
            stop_ids=jnp.asarray(stops, jnp.int32),
            temperature=per_row(temperature, np.float32, 0.0),
            top_k=per_row(top_k, np.int32, 0),
            top_p=per_row(top_p, np.float32, 1.0),
            min_p=per_row(min_p, np.float32, 0.0),
            key=jax.random.key(seed),
            step=jnp.int32(0),
        )
        return self._first(ds, logits, SamplingMode.of(temperature, top_k, top_p, min_p))

    @staticmethod
    def mode(ds: DecodeState) -> SamplingMode:
        return SamplingMode.of(
            np.asarray(ds.temperature), np.asarray(ds.top_k), np.asarray(ds.top_p), np.asarray(ds.min_p)
        )

    def step(self, ds: DecodeState, mode: SamplingMode | None = None) -> DecodeState:
        """One decode step (jitted; ``ds`` is donated)."""
        return self._decode_step(self.params, ds, mode or self.mode(ds))

    def loop(self, ds: DecodeState, mode: SamplingMode | None = None) -> DecodeState:
        """Decodes until every row is done, on the device (one ``jax.lax.while_loop``)."""
        return self._decode_loop(self.params, ds, mode or self.mode(ds))

    def steps(self, ds: DecodeState, n: int, mode: SamplingMode | None = None) -> DecodeState:
        """``n`` decode steps in one dispatch (jitted ``fori_loop``; ``ds`` is donated). Finished rows idle."""
        return self._decode_steps(self.params, ds, mode or self.mode(ds), n)

    def insert(
        self,
        ds: DecodeState,
        row: int,
        prompt: Sequence[int],
        *,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        mode: SamplingMode | None = None,
    ) -> DecodeState:
        """Starts ``prompt`` in row ``row`` of a running decode state (continuous batching).

        The prompt is prefilled into a 1-row cache of the same length as ``ds.cache`` (bucketed chunks, as
        :meth:`prefill`), whose K/V (all layers) and length are scattered into row ``row``; the row's token
        buffers, count and done flag are reset, its sampling settings set, and its first new token sampled.
        Other rows are untouched (``ds`` is donated). ``max_new_tokens`` defaults to the buffer size
        ``ds.tokens.shape[1]`` and may not exceed it.

        Raises ValueError: row out of range, empty prompt, prompt + max_new_tokens longer than the cache, bad
        sampling settings.
        """
        b, m = ds.tokens.shape
        if not 0 <= row < b:
            raise ValueError(f"row {row} out of range for a batch of {b}")
        max_new = m if max_new_tokens is None else max_new_tokens
        if not 1 <= max_new <= m:
            raise ValueError(f"max_new_tokens must be in [1, {m}] (the state's buffer), got {max_new_tokens}")
        sampling.validate_sampling(temperature, top_k, top_p, min_p)
        length = ds.cache.max_length
        if len(prompt) + max_new > length:
            raise ValueError(
                f"prompt of {len(prompt)} tokens + max_new_tokens {max_new} exceeds the cache length {length}"
            )
        cache, logits = self.prefill([prompt], self.new_cache(1, length))
        if mode is None:
            mode = SamplingMode.of(np.append(np.asarray(ds.temperature), temperature), top_k, top_p, min_p)
        return self._insert(
            ds,
            jnp.int32(row),
            cache,
            logits,
            jnp.int32(max_new),
            jnp.float32(temperature),
            jnp.int32(top_k),
            jnp.float32(top_p),
            jnp.float32(min_p),
            mode,
        )

    def generate_continuous(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        batch_size: int,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        seed: int = 0,
        stop_ids: Sequence[int] = (),
        stop_strings: Sequence[str] = (),
        tokenizer=None,
        steps_per_dispatch: int = 4,
    ) -> Iterator[tuple[int, Completion]]:
        """Generates every prompt with continuous refilling: ``batch_size`` rows decode together and a row whose
        sequence finished takes the next waiting prompt (:meth:`insert`) without waiting for the others.

        Yields ``(index, Completion)`` as each prompt finishes (in finishing order; ``index`` into ``prompts``).
        Decoding runs ``steps_per_dispatch`` steps per device call between host checks (finished rows idle for
        the rest of a dispatch). Greedy results equal generating each prompt alone. Sampling settings are
        scalars shared by all prompts; stop ids/strings and ``tokenizer`` as :meth:`generate`.

        Raises ValueError as :meth:`generate` (checked for every prompt before anything runs).
        """
        n = len(prompts)
        if n == 0:
            return
        if batch_size < 1 or steps_per_dispatch < 1:
            raise ValueError(f"batch_size and steps_per_dispatch must be >= 1, got {batch_size}, {steps_per_dispatch}")
        if stop_strings and tokenizer is None:
            raise ValueError("stop_strings needs a tokenizer")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
            if len(p) + max_new_tokens > self.max_length:
                raise ValueError(
                    f"prompt {i} of {len(p)} tokens + max_new_tokens {max_new_tokens} exceeds "
                    f"max_length {self.max_length}"
                )
        stops = set(stop_ids)
        if tokenizer is not None:
            stops |= set(getattr(tokenizer, "stop_ids", ()))
        b = min(batch_size, n)
        longest = max(len(p) for p in prompts)
        settings = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
        first = list(range(b))
        # the cache must hold the longest prompt of the whole job: start with it, pad to that length
        ds = self.start(
            [prompts[i] for i in first],
            max_new_tokens=max_new_tokens,
            batch_size=b,
            seed=seed,
            stop_ids=sorted(stops),
            **settings,
        )
        need = bucket_length(longest + max_new_tokens, self.max_length)
        if ds.cache.max_length < need:
            ds = self._grow(ds, need)
        mode = self.mode(ds)
        owner = list(first)  # prompt index of each row, or -1
        waiting = list(range(b, n))[::-1]
        stop_set = set(np.asarray(ds.stop_ids).tolist())
        while True:
            done = np.asarray(ds.done).copy()
            if stop_strings:
                counts = np.asarray(ds.num_generated)
                tokens = np.asarray(ds.tokens)
                for row in np.nonzero(~done)[0]:
                    if owner[row] >= 0:
                        text = tokenizer.decode(tokens[row, : counts[row]].tolist())
                        if any(x in text for x in stop_strings):
                            done[row] = True
                ds = ds.replace(done=jnp.asarray(done))
            finished = [row for row in range(b) if done[row] and owner[row] >= 0]
            if finished:
                tokens = np.asarray(ds.tokens)
                logprobs = np.asarray(ds.logprobs)
                counts = np.asarray(ds.num_generated)
                for row in finished:
                    idx = owner[row]
                    yield (
                        idx,
                        _completion(
                            prompts[idx],
                            tokens[row, : counts[row]].tolist(),
                            logprobs[row, : counts[row]].tolist(),
                            stop_set,
                            stop_strings,
                            tokenizer,
                        ),
                    )
                    owner[row] = -1
                    if waiting:
                        owner[row] = waiting.pop()
                        ds = self.insert(
                            ds, row, prompts[owner[row]], max_new_tokens=max_new_tokens, mode=mode, **settings
                        )
            if all(o < 0 for o in owner):
                return
            ds = self.steps(ds, steps_per_dispatch, mode)

    def _grow(self, ds: DecodeState, length: int) -> DecodeState:
        """The same state with a longer cache (zero slots appended)."""
        pad = length - ds.cache.max_length
        grown = {
            name: jnp.pad(x, [(0, 0)] * 2 + [(0, pad)] + [(0, 0)] * (x.ndim - 3))
            for name in _SLOT_ARRAYS
            if (x := getattr(ds.cache, name)) is not None
        }
        cache = ds.cache.replace(**grown)
        return ds.replace(cache=cache)

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int = 256,
        temperature=0.0,
        top_k=0,
        top_p=1.0,
        min_p=0.0,
        seed: int = 0,
        stop_ids: Sequence[int] = (),
        stop_strings: Sequence[str] = (),
        tokenizer=None,
        batch_size: int | None = None,
        stream: bool = False,
        speculative: str | None = None,
        draft=None,
        num_speculative: int = 4,
        ngram: int = 8,
    ):
        """Generates a continuation of every prompt (token id lists).

        Args:
          prompts: token ids per prompt (non-empty).
          max_new_tokens: budget per prompt.
          temperature, top_k, top_p, min_p: see :mod:`llama_jax.sampling` (temperature 0 = greedy).
          seed: PRNG seed; the same seed gives the same tokens.
          stop_ids: extra stop ids, united with ``tokenizer.stop_ids`` when a tokenizer is given.
          stop_strings: stop when the decoded text of a row contains one (needs ``tokenizer``); the text is
            cut before it.
          tokenizer: used for stop ids, stop strings and ``Completion.text``.
          batch_size: pad the batch to this many rows (bounded compilations).
          stream: return an iterator of ``(row, token, logprob)`` tuples as tokens are produced, ending with
            the list of Completions (a host loop over the same step); otherwise return the list of
            Completions (a device loop).
          speculative: None (plain decoding), "prompt_lookup" or "draft": speculative decoding
            (:func:`llama_jax.speculative.generate`; ``batch_size`` is then unused), with ``draft`` (a Llama,
            Engine or :class:`llama_jax.speculative.DraftModel` of the same vocabulary), ``num_speculative``
            tokens proposed per round and the prompt-lookup ``ngram`` size. Completions carry acceptance stats.

        Raises:
          ValueError: empty prompt, prompt too long, bad sampling settings, stop strings without tokenizer;
            with ``speculative`` also what :func:`llama_jax.speculative.generate` raises.
        """
        if speculative is not None:
            from llama_jax import speculative as spec

            return spec.generate(
                self,
                prompts,
                speculative=speculative,
                draft=draft,
                num_speculative=num_speculative,
                ngram=ngram,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                min_p=min_p,
                seed=seed,
                stop_ids=stop_ids,
                stop_strings=stop_strings,
                tokenizer=tokenizer,
                stream=stream,
            )
        stops = set(stop_ids)
        if tokenizer is not None:
            stops |= set(getattr(tokenizer, "stop_ids", ()))
        if stop_strings and tokenizer is None:
            raise ValueError("stop_strings needs a tokenizer")
        ds = self.start(
            prompts,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            seed=seed,
            stop_ids=sorted(stops),
        )
        it = self._stream(ds, prompts, stop_strings, tokenizer)
        if stream:
            return it
        if not stop_strings:
            ds = self.loop(ds)
            return self._completions(ds, prompts, stop_strings, tokenizer)
        results = None
        for item in it:
            results = item
        return results

    def _stream(self, ds, prompts, stop_strings, tokenizer) -> Iterator:
        n = len(prompts)
        mode = self.mode(ds)
        emitted = np.zeros((n,), np.int64)
        [[] for _ in range(n)]
        while True:
            tokens = np.asarray(ds.tokens[:n])
            logprobs = np.asarray(ds.logprobs[:n])
            counts = np.asarray(ds.num_generated[:n])
            done = np.asarray(ds.done).copy()
            for row in range(n):
                for j in range(emitted[row], counts[row]):
                    yield row, int(tokens[row, j]), float(logprobs[row, j])
                emitted[row] = counts[row]
                if stop_strings and not done[row]:
                    text = tokenizer.decode(tokens[row, : counts[row]].tolist())
                    if any(s in text for s in stop_strings):
                        done[row] = True
            if done.all():
                break
            if stop_strings:
                ds = ds.replace(done=jnp.asarray(done))
            ds = self.step(ds, mode)
        yield self._completions(ds, prompts, stop_strings, tokenizer)

    def _completions(self, ds, prompts, stop_strings, tokenizer) -> list[Completion]:
        n = len(prompts)
        tokens = np.asarray(ds.tokens[:n])
        logprobs = np.asarray(ds.logprobs[:n])
        counts = np.asarray(ds.num_generated[:n])
        stop_ids = set(np.asarray(ds.stop_ids).tolist())
        out = []
        for row in range(n):
            out.append(
                _completion(
                    prompts[row],
                    tokens[row, : counts[row]].tolist(),
                    logprobs[row, : counts[row]].tolist(),
                    stop_ids,
                    stop_strings,
                    tokenizer,
                )
            )
        return out


def _completion(prompt, toks, lps, stop_ids, stop_strings, tokenizer) -> Completion:
    """A row's Completion: finish reason from its last token / stop strings, text decoded without the stop."""
    reason = "stop" if toks and toks[-1] in stop_ids else "length"
    text = None
    if tokenizer is not None:
        body = toks[:-1] if reason == "stop" else toks
        text = tokenizer.decode(body)
        for s in stop_strings:
            cut = text.find(s)
            if cut >= 0:
                text, reason = text[:cut], "stop"
    return Completion(list(prompt), toks, lps, reason, text)


# ----------------------------------------------------------------------------------------------------------------
# Paged KV cache (issue 16): device functions for a running batch whose cache is a PagedKVCache. The host-side
# allocator (which pages a row holds, the page table, the prefix cache's shared pages) is in llama_jax.scheduler.
# ----------------------------------------------------------------------------------------------------------------
def _insert_row_paged(
    ds: DecodeState,
    row: jax.Array,
    length: jax.Array,
    logits: jax.Array,
    max_new: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    min_p: jax.Array,
    mode: SamplingMode,
) -> DecodeState:
    """Starts row ``row`` of a state whose cache is a ``PagedKVCache`` and whose pages already hold the row's
    prompt (prefilled through the row's page table, nothing to copy): sets its length to ``length``, resets its
    outputs and settings, and samples its first token from float32 ``logits`` [1, V] (other rows unchanged)."""
    new_cache = ds.cache.replace(lengths=ds.cache.lengths.at[row].set(length))
    return _start_row(ds, row, new_cache, logits, max_new, temperature, top_k, top_p, min_p, mode)


#: :func:`_insert_row_paged` jitted (``ds`` donated, ``mode`` static).
insert_paged = jax.jit(_insert_row_paged, donate_argnames=("ds",), static_argnames=("mode",))


def new_paged_cache(engine: Engine, batch_size: int, num_pages: int, page_size: int, pages_per_row: int):
    """An empty ``PagedKVCache`` for ``engine``'s model: a pool of ``num_pages`` pages of ``page_size`` tokens per
    layer (K/V in the engine's KV dtype), page tables int32 [batch_size, pages_per_row] with every entry unused
    (= ``num_pages``: writes there are dropped, reads masked), lengths 0.

    Raises ValueError: sizes not positive or rows longer than the context (:func:`init_paged_cache`), an int8
    KV cache or a mesh (the paged pool is single-device and float for now: use the dense cache there).
    """
    from llama_jax.kv_cache import init_paged_cache

    if engine.mesh is not None:
        raise ValueError("the paged KV cache is single-device for now; use the dense cache with a mesh")
    dtype = engine.model.dtype if engine.kv_dtype is None else jnp.dtype(engine.kv_dtype)
    if dtype == jnp.int8:
        raise ValueError("the paged KV cache stores float K/V; use the dense cache for kv_dtype='int8'")
    cache = init_paged_cache(engine.config, num_pages, page_size, batch_size, pages_per_row, dtype)
    return cache.replace(page_table=jnp.full((batch_size, pages_per_row), num_pages, jnp.int32))


def prefill_paged(engine: Engine, cache, tokens: Sequence[int], start: int):
    """Prefills ``tokens[start:]`` (positions start..len-1) into a 1-row ``PagedKVCache`` (the pool and one row's
    page table, which must hold pages for those positions; positions 0..start-1 are already in its pages, e.g.
    shared prefix-cache pages), in bucketed chunks as :meth:`Engine.prefill` (the pool is donated).

    Returns (cache with lengths [len(tokens)], float32 logits [1, V] at the last token).
    """
    n = len(tokens)
    if not 0 <= start < n:
        raise ValueError(f"start must be in [0, {n}), got {start}")
    rest = n - start
    chunk = bucket_length(rest, engine.chunk_size)
    padded = -(-rest // chunk) * chunk
    block = np.zeros((1, padded), np.int32)
    block[0, :rest] = tokens[start:]
    logits = jnp.zeros((1, engine.config.vocab_size), jnp.float32)
    last_index = jnp.asarray([n - 1], jnp.int32)
    for s in range(0, padded, chunk):
        cache, logits = engine._prefill_chunk(
            engine.params, cache, jnp.asarray(block[:, s : s + chunk]), jnp.int32(start + s), last_index, logits
        )
    return cache.replace(lengths=jnp.asarray([n], jnp.int32)), logits
