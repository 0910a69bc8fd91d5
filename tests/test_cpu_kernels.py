"""llama_jax.cpu_kernels: the int8 / bf16 few-row product custom calls equal XLA's product within float32
rounding, for every row count they take and for shapes off the vector width; gradients flow; the build is cached
and atomic; the model routes to them only where they apply."""

from __future__ import annotations

import os
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
    if not cpu_kernels.available():
        pytest.skip("no C++ compiler here to build llama_jax.cpu_kernels")


def _operands(dtype, rows, n_in, n_out, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((rows, n_in), dtype=np.float32))
    if dtype == "int8":
        w = jnp.asarray(rng.integers(-127, 128, (n_out, n_in), dtype=np.int8))
        scale = jnp.asarray(rng.uniform(1e-3, 2e-2, n_out).astype(np.float32))
        return x, w, scale
    w = jnp.asarray(rng.standard_normal((n_out, n_in), dtype=np.float32) * 0.05).astype(jnp.bfloat16)
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


@pytest.mark.parametrize("dtype", ["int8", "bfloat16"])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8])
@pytest.mark.parametrize("shape", [(576, 192), (1536, 576), (67, 129), (5, 3), (16, 1)])
def test_product_equals_oracle(built, dtype, rows, shape):
    """Row counts that exercise the 4-, 2- and 1-row blocks; input sizes off the 16/32-lane vector width (the
    masked tail) and output sizes off the 64-channel task chunk."""
    n_in, n_out = shape
    x, w, scale = _operands(dtype, rows, n_in, n_out, seed=rows)
    assert cpu_kernels.usable(w, rows)
    got = np.asarray(jax.jit(cpu_kernels.matmul)(x, w, scale))
    assert got.shape == (rows, n_out) and got.dtype == np.float32
    np.testing.assert_array_less(np.abs(got - _oracle(x, w, scale)), _tolerance(x, w, scale))


def test_int8_takes_up_to_its_row_limit_and_xla_takes_more(built):
    x, w, scale = _operands("int8", cpu_kernels.MAX_ROWS["int8"], 96, 80)
    got = np.asarray(cpu_kernels.matmul(x, w, scale))
    np.testing.assert_array_less(np.abs(got - _oracle(x, w, scale)), _tolerance(x, w, scale))
    assert cpu_kernels.usable(w, cpu_kernels.MAX_ROWS["int8"])
    assert not cpu_kernels.usable(w, cpu_kernels.MAX_ROWS["int8"] + 1)
    assert not cpu_kernels.usable(w.astype(jnp.float32), 1), "float32 weights keep XLA's dot"
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
    """project() sends few-row int8/bf16 "out_in" products to the kernel and gives the same values as with the
    kernels off (XLA's product), within float32 rounding."""
    from flax import nnx

    from llama_jax import model as model_lib

    rng = np.random.default_rng(3)
    for dtype in ("int8", "bfloat16"):
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
            if rows > cpu_kernels.MAX_ROWS[dtype]:  # bf16 x bf16 -> f32: activations rounded to bfloat16
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
