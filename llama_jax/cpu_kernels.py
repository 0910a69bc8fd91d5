"""Few-row products against int8 / bfloat16 weights on XLA:CPU, as jax.ffi custom calls.

Why: a decode step multiplies one activation row (or a few: a small batch, a speculative verify pass) by every
weight. XLA:CPU lowers that product, with an int8 or bfloat16 weight cast in the dot, to a generated loop fusion
whose speed depends on what it is fused with; and with two to a few rows it becomes an elementwise loop 4-10x
slower than the float32 dot. The kernel in ``kernels/cpu_matvec.cc`` is the plain memory-bound product: the weight
stored [out, in] (the model's "out_in" decode layout), widened to float32 in registers, float32 accumulation, each
weight read once per call whatever the row count, split over XLA's intra-op thread pool.

Build: compiled on first use for the host CPU (``g++ -O3 -march=native``) against the FFI headers that ship with
jaxlib, cached under ``$LLAMA_JAX_CACHE`` (default ``~/.cache/llama_jax``) by a hash of the source, the jaxlib
version and the CPU's flags, so machines of different ISAs never share a binary. Without a C++ compiler, or when
``LLAMA_JAX_CPU_KERNELS=0``, :func:`available` is False and :func:`llama_jax.model.project` keeps the XLA
product (same results within float32 rounding, slower).

Numerics: y[r, o] = scale[o] * sum_i x[r, i] * float(q[o, i]) (int8) or sum_i x[r, i] * float(w[o, i]) (bf16),
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

#: The most activation rows the kernel takes, by weight dtype; more rows (prefill chunks, large batches) go to
#: XLA's matrix product. Measured on SmolLM2-shaped layers (30 x q/k/v/o/gate/up/down, 2-core AVX-512 CPU), ms:
#:
#:   rows                          1     4     8     32    64    128
#:   float32 XLA dot              15.9  43.7  39.1  70.9  104.7 185.5
#:   int8 kernel                   5.3   9.5  15.6  42.2  96.6  191.3
#:   bf16 kernel                   8.1  13.2  30.6  90.5
#:   bf16 x bf16 XLA dot (R > 1)         23    -    47
MAX_ROWS = {"int8": 64, "bfloat16": 8}

_SOURCE = pathlib.Path(__file__).parent / "kernels" / "cpu_matvec.cc"
_TARGETS = {"llama_jax_matvec_i8": "LlamaJaxMatvecI8", "llama_jax_matvec_bf16": "LlamaJaxMatvecBF16"}


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

    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + jaxlib.__version__.encode() + _cpu_flags().encode()).hexdigest()[:16]
    lib = cache / f"cpu_matvec-{key}.so"
    if lib.exists():
        return lib
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++, c++ or clang++; or set CXX)")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        out = pathlib.Path(tmp) / lib.name
        cmd = [compiler, "-O3", "-march=native", "-std=c++20", "-shared", "-fPIC", "-w",
               f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", str(out)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(out, lib)  # atomic: a concurrent build or a crash never leaves a half-written library
    return lib


@functools.cache
def available() -> bool:
    """True when the kernels are built, loaded and registered for the CPU platform (built on first call)."""
    if os.environ.get("LLAMA_JAX_CPU_KERNELS", "1") == "0":
        return False
    cache = pathlib.Path(os.environ.get("LLAMA_JAX_CACHE") or pathlib.Path.home() / ".cache" / "llama_jax")
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build(cache)))
        for target, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except (OSError, RuntimeError, AttributeError) as e:
        logging.warning("CPU int8/bf16 kernels unavailable, using XLA's product: %s", e)
        return False
    return True


def usable(w: jax.Array, rows: int) -> bool:
    """Whether :func:`matmul` serves a product of ``rows`` activation rows with weight ``w`` [O, I] here: a CPU
    backend with one device (the custom call is not partitioned over a mesh), int8 or bf16 ``w``, and
    1 <= rows <= :data:`MAX_ROWS` of its dtype."""
    return (
        1 <= rows <= MAX_ROWS.get(jnp.dtype(w.dtype).name, 0)
        and jax.default_backend() == "cpu"
        and jax.device_count() == 1
        and available()
    )


def _xla_matmul(x, w, scale):
    y = jnp.matmul(x, w.astype(jnp.float32).T)
    return y if scale is None else y * scale


@jax.custom_vjp
def _kernel_matmul(x, w, scale):
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32)
    if w.dtype == jnp.int8:
        return jax.ffi.ffi_call("llama_jax_matvec_i8", out)(x, w, scale)
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
    bfloat16 with no scale) -> float32 [R, O] = (x @ float(w).T) * scale. Call only where :func:`usable` is True.

    Raises ValueError on shapes that do not match.
    """
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"cpu_kernels.matmul: want x [R, I] and w [O, I], got {x.shape} and {w.shape}")
    if (w.dtype == jnp.int8) != (scale is not None):
        raise ValueError("cpu_kernels.matmul: an int8 weight needs its scale [O]; a bf16 weight takes none")
    if scale is not None:
        scale = scale.reshape(w.shape[0]).astype(jnp.float32)
    return _kernel_matmul(x.astype(jnp.float32), w, scale)
