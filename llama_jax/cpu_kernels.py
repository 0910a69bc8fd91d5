"""Few-row products against int8 / bfloat16 / float32 weights on XLA:CPU, as jax.ffi custom calls.

Why: a decode step multiplies one activation row (or a few: a small batch, a speculative verify pass) by every
weight. XLA:CPU lowers that product, with an int8 or bfloat16 weight cast in the dot, to a generated loop fusion
whose speed depends on what it is fused with; and with two to a few rows it becomes an elementwise loop 4-10x
slower than the float32 dot. Even float32 weights are read 1.3-3x slower than the bandwidth allows by XLA's dot at
2-16 rows. The kernel in ``kernels/cpu_matvec.cc`` is the plain memory-bound product: the weight
stored [out, in] (the model's "out_in" decode layout), widened to float32 in registers, float32 accumulation, each
weight read once per call whatever the row count, split over XLA's intra-op thread pool.

Build: compiled on first use for the host CPU (``g++ -O3 -march=native``) against the FFI headers that ship with
jaxlib, cached under ``$LLAMA_JAX_CACHE`` (default ``~/.cache/llama_jax``) by a hash of the source, the jaxlib
version and the CPU's flags, so machines of different ISAs never share a binary. Without a C++ compiler, or when
``LLAMA_JAX_CPU_KERNELS=0``, :func:`available` is False and :func:`llama_jax.model.project` keeps the XLA
product (same results within float32 rounding, slower).

Numerics: y[r, o] = scale[o] * sum_i x[r, i] * float(q[o, i]) (int8) or sum_i x[r, i] * float(w[o, i]) (bf16, float32),
float32 accumulation in a different order than XLA's dot: equal within float32 rounding. Gradients (a custom VJP)
use the XLA product, so training through a quantized or bf16 model is unchanged.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
from absl import logging

#: The most activation rows the kernel takes, by weight dtype; more rows (prefill chunks) go to XLA's matrix
#: product. Measured on SmolLM2-shaped layers (30 x q/k/v/o/gate/up/down, weights [out, in], 2-core AVX-512 CPU,
#: min of 21 runs, ms; `4x4 tiles` is the register-tiled kernel of kernels/cpu_matvec.cc, `1-row` the one before it):
#:
#:   rows                          1     2     4     5     8     16    32    64
#:   float32, 4x4 tiles           14.2  17.0  16.4  18.7  20.8  28.8  46.7  94.3
#:   float32, 1-row kernel        16.2  15.2  20.5  20.1  23.5  33.1  54.4
#:   bf16, 4x4 tiles               6.6   6.8   7.9  10.9  13.9  24.5  45.0  95.8
#:   bf16, 1-row kernel            7.5   8.5  14.3  15.7  25.0
#:   int8, 4x4 tiles               3.6   3.9   6.2   8.6  11.4  21.9  42.4  84.1
#:   int8, 1-row kernel            4.2   5.2   7.5   9.8  12.9  22.6  42.1
#:
#: XLA's float32 dot on the same shapes (another machine of this kind): [out, in] weight 14.4 / 52.3 / 42.3 / 47.2 /
#: 61.3 / 82.4 ms at 1 / 2 / 4 / 8 / 16 / 32 rows; [in, out] weight 18.7 / 31.3 / 33.5 / 37.4 / 46.8 / 63.9, and
#: 104.7 / 185.5 at 64 / 128 rows, where the tiled kernel (94.3 at 64, 183 at 128) stops gaining. bf16 stops at 8
#: rows: past that XLA's bf16 x bf16 -> f32 dot (activations rounded to bf16) decoded SmolLM2 at batch 32 faster
#: end to end (bench_generate: 469 vs 359 tok/s).
MAX_ROWS = {"int8": 64, "bfloat16": 8, "float32": 64}

_SOURCES = tuple(pathlib.Path(__file__).parent / "kernels" / f for f in ("cpu_matvec.cc", "cpu_decode_attention.cc"))
_HEADERS = (pathlib.Path(__file__).parent / "kernels" / "parallel_for.h",)
_TARGETS = {
    "llama_jax_matvec_i8": "LlamaJaxMatvecI8",
    "llama_jax_matvec_bf16": "LlamaJaxMatvecBF16",
    "llama_jax_matvec_f32": "LlamaJaxMatvecF32",
    "llama_jax_decode_attention_f32": "LlamaJaxDecodeAttentionF32",
    "llama_jax_decode_attention_bf16": "LlamaJaxDecodeAttention16",
    "llama_jax_decode_attention_i8": "LlamaJaxDecodeAttentionI8",
    "llama_jax_kv_write": "LlamaJaxKVWrite",
}
#: Compiler flags: the host's ISA; `omp simd` loops vectorised without OpenMP's runtime.
_FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-std=c++20", "-shared", "-fPIC", "-w")
#: Cache dtypes the decode attention kernel reads (a bfloat16 cache also as its uint16 bit patterns).
ATTENTION_CACHE_DTYPES = {"float32": "f32", "bfloat16": "bf16", "int8": "i8"}
#: The most query tokens per row the attention kernel takes: decode steps and speculative verify chunks, and
#: prefill chunks (the engine's default chunk is 512), where it measured 1.0-1.5x the XLA blockwise path
#: (SmolLM2 float32 prefill of 512 / 4096 / 8000 tokens: 614 / 379 / 268 tok/s against 624 / 351 / 224;
#: bfloat16: 1107 / 549 / 322 against 767 / 270 / 222).
ATTENTION_MAX_T = 4096


def _cpu_flags() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() + platform.machine()


def _build(cache: pathlib.Path) -> pathlib.Path:
    """Compile the kernel library (once per source, jaxlib version and CPU), atomically; returns its path."""
    import jaxlib

    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++, c++ or clang++; or set CXX)")
    source = b"".join(f.read_bytes() for f in (*_SOURCES, *_HEADERS))
    key = hashlib.sha256(
        b"\0".join([source, jaxlib.__version__.encode(), _cpu_flags().encode(), " ".join(_FLAGS).encode()])
    ).hexdigest()[:16]
    lib = cache / f"cpu_kernels-{key}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        out = pathlib.Path(tmp) / lib.name
        cmd = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", *map(str, _SOURCES), "-o", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(out, lib)  # atomic: a concurrent build or a crash never leaves a half-written library
    return lib


def _cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("LLAMA_JAX_CACHE") or pathlib.Path.home() / ".cache" / "llama_jax")


@functools.cache
def available() -> bool:
    """True when the kernels are built, loaded and registered for the CPU platform (built on first call)."""
    if os.environ.get("LLAMA_JAX_CPU_KERNELS", "1") == "0":
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build(_cache_dir())))
        for target, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except (OSError, RuntimeError, AttributeError) as e:
        logging.warning("CPU kernels unavailable, using XLA's product: %s", e)
        return False
    return True


def _one_device_cpu() -> bool:
    return jax.default_backend() == "cpu" and jax.device_count() == 1 and available()


def usable(w: jax.Array, rows: int) -> bool:
    """Whether :func:`matmul` serves a product of ``rows`` activation rows with weight ``w`` [O, I] here: a CPU
    backend with one device (the custom call is not partitioned over a mesh), int8, bf16 or float32 ``w``, and
    1 <= rows <= :data:`MAX_ROWS` of its dtype."""
    return 1 <= rows <= MAX_ROWS.get(jnp.dtype(w.dtype).name, 0) and _one_device_cpu()


def _xla_matmul(x, w, scale):
    y = jnp.matmul(x, w.astype(jnp.float32).T)
    return y if scale is None else y * scale


@jax.custom_vjp
def _kernel_matmul(x, w, scale):
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32)
    if w.dtype == jnp.int8:
        return jax.ffi.ffi_call("llama_jax_matvec_i8", out)(x, w, scale)
    if w.dtype == jnp.float32:
        return jax.ffi.ffi_call("llama_jax_matvec_f32", out)(x, w)
    return jax.ffi.ffi_call("llama_jax_matvec_bf16", out)(x, w)


def _fwd(x, w, scale):
    return _kernel_matmul(x, w, scale), (x, w, scale)


def _bwd(res, g):
    x, w, scale = res
    _, vjp = jax.vjp(_xla_matmul, x, w, scale)
    return vjp(g)


_kernel_matmul.defvjp(_fwd, _bwd)


def matmul(x: jax.Array, w: jax.Array, scale: jax.Array | None = None) -> jax.Array:
    """x [R, I] (any float dtype, R <= :data:`MAX_ROWS`) times w [O, I] (int8 with ``scale`` float [O], or
    bfloat16 / float32 with no scale) -> float32 [R, O] = (x @ float(w).T) * scale. Call only where :func:`usable`
    is True.

    Raises ValueError on shapes that do not match, RuntimeError where the kernels are not built.
    """
    _require()
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"cpu_kernels.matmul: want x [R, I] and w [O, I], got {x.shape} and {w.shape}")
    if (w.dtype == jnp.int8) != (scale is not None):
        raise ValueError("cpu_kernels.matmul: an int8 weight needs its scale [O]; a bf16 or float32 weight takes none")
    if scale is not None:
        scale = scale.reshape(w.shape[0]).astype(jnp.float32)
    return _kernel_matmul(x.astype(jnp.float32), w, scale)


def _require() -> None:
    if not available():
        raise RuntimeError("llama_jax.cpu_kernels are not built here (see the warning above); check usable() first")


def attention_usable(q: jax.Array, k: jax.Array, bits_of: str | None = None) -> bool:
    """Whether :func:`decode_attention` serves queries ``q`` [B, T, N, H] against cache ``k`` here: a one-device
    CPU backend, T <= :data:`ATTENTION_MAX_T`, a float32, bfloat16 (or its uint16 bits, ``bits_of="bfloat16"``)
    or int8 cache."""
    name = bits_of if bits_of is not None else jnp.dtype(k.dtype).name
    if bits_of is not None and k.dtype != jnp.uint16:
        return False
    return q.ndim == 4 and q.shape[1] <= ATTENTION_MAX_T and name in ATTENTION_CACHE_DTYPES and _one_device_cpu()


def decode_attention(q, k, v, q_positions, *, k_scale=None, v_scale=None, layer=None, bits_of=None) -> jax.Array:
    """Causal GQA attention of query chunks (decode steps, verify chunks, prefill chunks of up to
    :data:`ATTENTION_MAX_T` tokens) over a dense KV cache, read in place (no block copies, no loop in the compiled
    program): the kernel of ``kernels/cpu_decode_attention.cc``.

    Args:
      q: [B, T, N, H] queries (RoPE applied), any float dtype (computed in float32).
      k, v: the cache, [L, B, S, K, H] with ``layer`` (an int or int32 scalar) or [B, S, K, H]: float32,
        bfloat16 (or uint16 bit patterns with ``bits_of="bfloat16"``), or int8 with ``k_scale`` / ``v_scale``
        float32 [(L,) B, S, K].
      q_positions: int32 [B, T]; query (b, t) attends to slots s <= q_positions[b, t] (see
        :mod:`llama_jax.kv_cache`: slot s holds position s).

    Returns [B, T, N, H] in q's dtype: the same values as :func:`llama_jax.attention.attend` within float32
    rounding (float32 scores, softmax and accumulation; zeros for a query that sees no slot).

    Raises ValueError on shapes or dtypes the kernel does not take (check :func:`attention_usable`),
    RuntimeError where the kernels are not built.
    """
    _require()
    name = bits_of if bits_of is not None else jnp.dtype(k.dtype).name
    if name not in ATTENTION_CACHE_DTYPES or (name == "int8") != (k_scale is not None):
        raise ValueError(f"decode_attention: cache dtype {name} with scales={k_scale is not None} not supported")
    stacked = k.ndim == 5
    if q.ndim != 4 or k.ndim not in (4, 5) or k.shape != v.shape or stacked != (layer is not None):
        raise ValueError(f"decode_attention: want q [B, T, N, H] and k/v [(L,) B, S, K, H] (layer given iff L), got "
                         f"{q.shape}, {k.shape}, {v.shape}, layer={layer}")  # fmt: skip
    # a uint16 view goes in as it is (the kernel reads the bits; a bitcast of a whole cache may be a copy)
    none = jnp.zeros((1,), jnp.float32)
    layer = jnp.asarray(0 if layer is None else layer, jnp.int32).reshape(1)
    out = jax.ffi.ffi_call(
        f"llama_jax_decode_attention_{ATTENTION_CACHE_DTYPES[name]}", jax.ShapeDtypeStruct(q.shape, jnp.float32)
    )(
        q.astype(jnp.float32),
        k,
        v,
        none if k_scale is None else k_scale.astype(jnp.float32),
        none if v_scale is None else v_scale.astype(jnp.float32),
        q_positions.astype(jnp.int32),
        layer,
    )
    return out.astype(q.dtype)


def cache_in_place(k: jax.Array) -> bool:
    """Whether a dense bfloat16 KV cache ``k`` is written by :func:`cache_write` and read by
    :func:`decode_attention` as it is, with no uint16 view (:meth:`llama_jax.kv_cache.KVCache.as_bits`): on a
    one-device CPU backend where the kernels are built."""
    return k.dtype == jnp.bfloat16 and _one_device_cpu()


def cache_write(cache: jax.Array, layer, positions: jax.Array, values: jax.Array) -> jax.Array:
    """``cache.at[layer, rows, positions].set(values, mode="drop")`` in place (the result aliases ``cache``).

    Args:
      cache: [L, B, S, K, H] (``layer`` an int or int32 scalar) or [B, S, K, H] (``layer`` None), any dtype.
      positions: int32 [B, T] slots to write; slots outside [0, S) are dropped.
      values: [B, T, K, H], cast to the cache's dtype.

    Raises ValueError on shapes that do not match, RuntimeError where the kernels are not built.
    """
    _require()
    if cache.ndim not in (4, 5) or values.ndim != 4 or (cache.ndim == 5) != (layer is not None):
        raise ValueError(f"cache_write: want cache [(L,) B, S, K, H] (layer given iff L) and values [B, T, K, H], "
                         f"got {cache.shape}, {values.shape}, layer={layer}")  # fmt: skip
    layer = jnp.asarray(0 if layer is None else layer, jnp.int32).reshape(1)
    call = jax.ffi.ffi_call("llama_jax_kv_write", jax.ShapeDtypeStruct(cache.shape, cache.dtype),
                            input_output_aliases={0: 0})  # fmt: skip
    return call(cache, values.astype(cache.dtype), positions.astype(jnp.int32), layer)
