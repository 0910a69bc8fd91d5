"""llama_jax.cpu_kernels: the int8 / bf16 / float32 few-row product custom calls equal XLA's product within float32
rounding, for every row count they take and for shapes off the vector width; gradients flow; the build is cached
and atomic; the model routes to them only where they apply."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import cpu_kernels

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU custom calls")


@pytest.fixture(scope="module")
def built():
    """The kernels must build wherever there is a compiler (a broken build fails here, never skips)."""
    if not cpu_kernels.available():
        if shutil.which("g++") or shutil.which("c++") or shutil.which("clang++"):
            cpu_kernels.available.cache_clear()
            cpu_kernels._build(cpu_kernels._cache_dir())  # raises with the compiler's message
        pytest.skip("no C++ compiler here to build llama_jax.cpu_kernels")


def _operands(dtype, rows, n_in, n_out, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((rows, n_in), dtype=np.float32))
    if dtype == "int8":
        w = jnp.asarray(rng.integers(-127, 128, (n_out, n_in), dtype=np.int8))
        scale = jnp.asarray(rng.uniform(1e-3, 2e-2, n_out).astype(np.float32))
        return x, w, scale
    w = jnp.asarray(rng.standard_normal((n_out, n_in), dtype=np.float32) * 0.05).astype(dtype)
    return x, w, None


def _oracle(x, w, scale):
    """float64 product of the exact (widened) operands."""
    y = np.asarray(x, np.float64) @ np.asarray(w.astype(jnp.float32), np.float64).T
    return y if scale is None else y * np.asarray(scale, np.float64)


def _tolerance(x, w, scale):
    """float32 accumulation of I terms: |error| <= ~I * eps * sum |x_i w_i| (a loose, order-free bound)."""
    ab = np.abs(np.asarray(x, np.float64)) @ np.abs(np.asarray(w.astype(jnp.float32), np.float64)).T
    if scale is not None:
        ab = ab * np.asarray(scale, np.float64)
    return 4 * np.sqrt(x.shape[1]) * np.finfo(np.float32).eps * ab + 1e-30


@pytest.mark.parametrize("dtype", ["int8", "bfloat16", "float32"])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("shape", [(576, 192), (1536, 576), (67, 129), (5, 3), (16, 1)])
def test_product_equals_oracle(built, dtype, rows, shape):
    """Row counts that exercise the one-row path, the 2-4-row weight stream, the 4-row tiles and their 3-, 2- and
    1-row remainders; input sizes off the 16/32-lane vector width (the masked tail) and output sizes off the
    4-channel tile and the 64-channel task chunk."""
    n_in, n_out = shape
    x, w, scale = _operands(dtype, rows, n_in, n_out, seed=rows)
    assert cpu_kernels.usable(w, rows)
    got = np.asarray(jax.jit(cpu_kernels.matmul)(x, w, scale))
    assert got.shape == (rows, n_out) and got.dtype == np.float32
    np.testing.assert_array_less(np.abs(got - _oracle(x, w, scale)), _tolerance(x, w, scale))


@pytest.mark.parametrize("dtype", ["int8", "bfloat16", "float32"])
def test_kernel_takes_up_to_its_row_limit_and_xla_takes_more(built, dtype):
    rows = cpu_kernels.MAX_ROWS[dtype]
    x, w, scale = _operands(dtype, rows, 96, 80)
    got = np.asarray(cpu_kernels.matmul(x, w, scale))
    np.testing.assert_array_less(np.abs(got - _oracle(x, w, scale)), _tolerance(x, w, scale))
    assert cpu_kernels.usable(w, rows)
    assert not cpu_kernels.usable(w, rows + 1)
    assert not cpu_kernels.usable(w.astype(jnp.float16), 1), "float16 weights keep XLA's dot"
    assert not cpu_kernels.usable(w, 0)


def test_gradient_is_the_xla_products(built):
    x, w, _ = _operands("bfloat16", 3, 40, 24)
    cot = jnp.asarray(np.random.default_rng(1).standard_normal((3, 24), dtype=np.float32))

    def loss(f, x, w):
        return jnp.sum(f(x, w) * cot)

    def ours(x, w):
        return cpu_kernels.matmul(x, w)

    def xla(x, w):
        return x @ w.astype(jnp.float32).T

    gx, gw = jax.grad(lambda x, w: loss(ours, x, w), argnums=(0, 1))(x, w)
    rx, rw = jax.grad(lambda x, w: loss(xla, x, w), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(rx), rtol=1e-6)
    assert gw.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(gw, np.float32), np.asarray(rw, np.float32))


def test_bad_operands_name_the_problem(built):
    x, w, scale = _operands("int8", 2, 32, 16)
    with pytest.raises(ValueError, match=r"want x \[R, I\] and w \[O, I\]"):
        cpu_kernels.matmul(x[:, :31], w, scale)
    with pytest.raises(ValueError, match="needs its scale"):
        cpu_kernels.matmul(x, w, None)


def test_model_products_route_by_rows_dtype_and_layout(built):
    """project() sends few-row int8/bf16/float32 "out_in" products to the kernel and gives the same values as with the
    kernels off (XLA's product), within float32 rounding."""
    from flax import nnx

    from llama_jax import model as model_lib

    rng = np.random.default_rng(3)
    for dtype in ("int8", "bfloat16", "float32"):
        _, w, scale = _operands(dtype, 1, 64, 48, seed=4)
        value = w if scale is None else cpu_kernels_qarray(w, scale)
        param = nnx.Param(
            value, out_sharding=("mlp", "embed"), eager_sharding=False
        )  # gate_proj in the "out_in" layout: [F, D]
        for rows in (1, 6, 9, 70):
            x = jnp.asarray(rng.standard_normal((rows, 64), dtype=np.float32))
            text = jax.jit(lambda x, p=param: model_lib.project(x, p, "gate_proj")).lower(x).as_text()
            uses = "llama_jax_matvec" in text
            assert uses == cpu_kernels.usable(w, rows), (dtype, rows)
            got = np.asarray(model_lib.project(x, param, "gate_proj"))
            ref = _oracle(x, w, scale)
            tol = _tolerance(x, w, scale)
            if rows > cpu_kernels.MAX_ROWS[dtype] and dtype != "float32":  # bf16 x bf16: activations rounded
                tol = 2 * 2.0**-8 * (np.abs(np.asarray(x)) @ np.abs(np.asarray(w.astype(jnp.float32))).T)
                tol = tol * (1 if scale is None else np.asarray(scale))
            np.testing.assert_array_less(np.abs(got - ref), tol + 1e-6)


def cpu_kernels_qarray(w, scale):
    from llama_jax.quant import QArray

    return QArray(q=w, scale=scale.reshape(-1, 1))


def test_build_is_cached_by_source_and_cpu(built, tmp_path):
    """A fresh cache directory gets one library, named by the hash; a second build reuses it; no temporary files
    are left behind."""
    first = cpu_kernels._build(tmp_path)
    mtime = first.stat().st_mtime_ns
    assert cpu_kernels._build(tmp_path) == first and first.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


def test_disabled_or_unbuildable_falls_back_to_xla(tmp_path):
    """LLAMA_JAX_CPU_KERNELS=0, or no compiler at all, leaves available() False with the model still working."""
    code = (
        "import jax.numpy as jnp; from llama_jax import cpu_kernels as c; "
        "w = jnp.zeros((4, 8), jnp.int8); print(c.available(), c.usable(w, 1))"
    )
    env = dict(os.environ, LLAMA_JAX_CPU_KERNELS="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), LLAMA_JAX_CACHE=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
    assert "kernels unavailable" in out.stderr


# ------------------------------------------------------------------------------------------------ decode attention
def _cache(dtype, b, s, kh, h, seed):
    rng = np.random.default_rng(seed)
    k, v = (jnp.asarray(rng.standard_normal((b, s, kh, h), dtype=np.float32)) for _ in range(2))
    if dtype == "int8":
        from llama_jax.kv_cache import quantize_kv

        (k, ks), (v, vs) = quantize_kv(k), quantize_kv(v)
        return k, v, dict(k_scale=ks, v_scale=vs)
    return k.astype(dtype), v.astype(dtype), {}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "bf16_bits", "int8"])
@pytest.mark.parametrize("t", [1, 3, 16, 17, 130])
def test_decode_attention_equals_blockwise_path(built, dtype, t):
    """Ragged rows (one 20x longer than another, one on a 64-slot chunk edge, one ending on the last slot), GQA
    groups of 1 and 3, a stacked cache read at a layer: the kernel equals the XLA blockwise path. T 17 and 130 are
    prefill-sized chunks (tasks of 64 tokens and a remainder, scores as a matrix product; a row's last tokens
    beyond the cache see every slot)."""
    from llama_jax import attention

    b, s = 4, 700
    for n, kh, h in ((6, 2, 64), (4, 4, 32)):
        rng = np.random.default_rng(n + t)
        q = jnp.asarray(rng.standard_normal((b, t, n, h), dtype=np.float32))
        k, v, scales = _cache("bfloat16" if dtype == "bf16_bits" else dtype, b, s, kh, h, seed=t)
        first = jnp.asarray([[30], [600], [63], [s - t]], jnp.int32)
        positions = first + jnp.arange(t, dtype=jnp.int32)[None]
        ref = attention.attend(q, k, v, positions, cached=True, implementation="blockwise", **scales)
        bits = None
        if dtype == "bf16_bits":
            k, v, bits = (
                jax.lax.bitcast_convert_type(k, jnp.uint16),
                jax.lax.bitcast_convert_type(v, jnp.uint16),
                "bfloat16",
            )
        assert cpu_kernels.attention_usable(q, k, bits)
        got = cpu_kernels.decode_attention(q, k, v, positions, bits_of=bits, **scales)
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-5, rtol=1e-4)
        stacked = {name: jnp.stack([jnp.zeros_like(x), x]) for name, x in scales.items()}

        def at_layer(q, k, v, p, layer, bits=bits, stacked=stacked):
            return cpu_kernels.decode_attention(q, k, v, p, layer=layer, bits_of=bits, **stacked)

        got = jax.jit(at_layer)(
            q, jnp.stack([jnp.zeros_like(k), k]), jnp.stack([jnp.zeros_like(v), v]), positions, jnp.int32(1)
        )
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-5, rtol=1e-4)


def test_decode_attention_routing_and_refusals(built):
    """attend() takes the kernel for decode-sized cached chunks with no block size forced; a query that sees no
    slot gives zeros (as the XLA path); float16 caches and chunks over ATTENTION_MAX_T stay on the XLA path."""
    from llama_jax import attention

    q = jnp.ones((2, 1, 2, 8), jnp.float32)
    k, v, _ = _cache("float32", 2, 16, 1, 8, seed=0)
    pos = jnp.asarray([[-1], [5]], jnp.int32)
    text = jax.jit(lambda q, k, v, p: attention.attend(q, k, v, p, cached=True)).lower(q, k, v, pos).as_text()
    assert "llama_jax_decode_attention_f32" in text
    out = attention.attend(q, k, v, pos, cached=True)
    np.testing.assert_array_equal(np.asarray(out[0]), 0)
    ref = attention.attend(q, k, v, pos, cached=True, implementation="blockwise")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-6)
    assert not cpu_kernels.attention_usable(q, k.astype(jnp.float16))
    assert not cpu_kernels.attention_usable(jnp.ones((2, cpu_kernels.ATTENTION_MAX_T + 1, 2, 8)), k)
    assert not cpu_kernels.attention_usable(q, k.astype(jnp.uint16), None)
    with pytest.raises(ValueError, match="not supported"):
        cpu_kernels.decode_attention(q, k.astype(jnp.float16), v.astype(jnp.float16), pos)
    with pytest.raises(ValueError, match="layer given"):
        cpu_kernels.decode_attention(q, k, v, pos, layer=0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "int8"])
def test_cache_write_equals_scatter_and_drops_out_of_range(built, dtype):
    """cache_write == .at[layer, rows, positions].set(mode="drop") bit for bit: ragged positions, T 1 and 3,
    slots past the end dropped, other layers untouched; under jit, in a loop carry."""
    rng = np.random.default_rng(0)
    cache = jnp.asarray(rng.standard_normal((3, 2, 10, 2, 4), dtype=np.float32) * 9).astype(dtype)
    for t, pos in ((1, [[4], [9]]), (3, [[0, 1, 2], [8, 9, 10]]), (1, [[12], [3]])):
        positions = jnp.asarray(pos, jnp.int32)
        values = jnp.asarray(rng.standard_normal((2, t, 2, 4), dtype=np.float32) * 9).astype(dtype)
        rows = jnp.arange(2)[:, None]
        ref = cache.at[1, rows, positions].set(values, mode="drop")
        got = jax.jit(cpu_kernels.cache_write)(cache, jnp.int32(1), positions, values)
        np.testing.assert_array_equal(np.asarray(got).view(np.uint8), np.asarray(ref).view(np.uint8))

    def steps(cache, values):  # the decode loop's form: the cache in a while-loop carry, written each step
        def body(i, c):
            return cpu_kernels.cache_write(c, i % 3, jnp.full((2, 1), i, jnp.int32), values + i.astype(dtype))

        return jax.lax.fori_loop(0, 6, body, cache)

    values = jnp.ones((2, 1, 2, 4), dtype)
    ref = cache
    for i in range(6):
        ref = ref.at[i % 3, jnp.arange(2)[:, None], jnp.full((2, 1), i)].set(values + np.asarray(i).astype(dtype))
    got = jax.jit(steps)(cache, values)
    np.testing.assert_array_equal(np.asarray(got).view(np.uint8), np.asarray(ref).view(np.uint8))
    with pytest.raises(ValueError, match="layer given iff"):
        cpu_kernels.cache_write(cache, None, jnp.zeros((2, 1), jnp.int32), values)


def test_bf16_cache_is_written_and_read_in_place(built):
    """A bf16 KV cache on CPU: the compiled decode step writes it with the in-place custom call and reads it with
    the attention kernel, and never converts or copies the whole cache (no uint16 view)."""
    import re

    from flax import nnx

    from llama_jax.engine import Engine, SamplingMode
    from llama_jax.model import Llama
    from tests.reference import tiny_config

    cfg = tiny_config(n_layers=2, max_seq_len=256)
    model = Llama(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
    engine = Engine(model, max_length=256, kv_dtype="bfloat16")
    ds = engine.start([[1, 2, 3]], max_new_tokens=4)
    text = engine._decode_step.lower(engine.params, ds, SamplingMode()).compile().as_text()
    assert len(re.findall(r'custom_call_target="llama_jax_kv_write"', text)) == 2 * cfg.n_layers
    assert len(re.findall(r'custom_call_target="llama_jax_decode_attention_bf16"', text)) == cfg.n_layers
    cache_elems = cfg.n_layers * 1 * 256 * cfg.n_kv_heads * cfg.head_dim
    big = [ln for ln in text.splitlines() if re.search(rf"(u16|f32|bf16)\[{cfg.n_layers},1,256,", ln)]
    big = [ln for ln in big if re.search(r"= \w+\[[\d,]+\]\{[^}]*\} (convert|bitcast-convert|copy|fusion)\(", ln)]
    assert not big, f"whole-cache copies ({cache_elems} elements):\n" + "\n".join(big)
