"""Issue 14: weight layouts per backend (llama_jax.model.project / Llama.set_weight_layout, engine.decode_layout).

Every fast layout has its naive twin: the same weights, same dtype, in the checkpoint's "in_out" layout with
stacked (scanned) layers. Each (dtype, layout) path must give its twin's logits within that dtype's rounding and
the same greedy tokens; on CPU the compiled decode step must read every weight as stored (no float copy of a
weight, no slice copy of a stacked array), read from the compiled HLO text.
"""

import dataclasses
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax import checkpoint, cpu_kernels, quant
from llama_jax.engine import Engine, SamplingMode, decode_layout
from llama_jax.model import WEIGHT_LAYOUTS, Llama
from tests.conftest import REPO
from tests.numerics import logits_tolerance
from tests.reference import randomize, tiny_config

DTYPES = ("float32", "bfloat16", "int8")
CFG = tiny_config(max_seq_len=128)


def _model(dtype: str, cfg=CFG, seed=0) -> Llama:
    """A random tiny model with weights stored as ``dtype`` (int8: llama_jax.quant of the float32 weights)."""
    param_dtype = jnp.float32 if dtype == "int8" else jnp.dtype(dtype)
    model = randomize(Llama(cfg, rngs=nnx.Rngs(seed), param_dtype=param_dtype), seed, std=0.2)
    return quant.quantize_model(model) if dtype == "int8" else model


def _tolerance(dtype: str, logits: np.ndarray) -> float:
    # compute dtype rounding: float32 (int8 weights are multiplied in float32) ~1e-5 relative for a 2-layer model;
    # bfloat16 activations round to 8 mantissa bits at every layer: a few 2^-8 of the logit scale.
    eps = 2.0**-8 if dtype == "bfloat16" else 1e-5
    return 4 * eps * float(np.max(np.abs(logits)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tied", [False, True])
def test_every_layout_gives_its_naive_twins_logits(dtype, tied):
    cfg = dataclasses.replace(CFG, tie_word_embeddings=tied)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 11)))
    twin = np.asarray(_model(dtype, cfg)(tokens), np.float32)  # stacked, "in_out"
    for unstack in (False, True):
        model = _model(dtype, cfg)
        if unstack:
            model.unstack_layers()
        model.set_weight_layout("out_in")
        assert model.weight_layout == "out_in"
        q = model.layers[0].attention.q_proj if unstack else model.layers.attention.q_proj
        axes = q.get_metadata()["out_sharding"]
        assert axes[-1] == "embed" and ("layers" in axes) != unstack  # logical axes permuted
        out = np.asarray(model(tokens), np.float32)
        np.testing.assert_allclose(out, twin, rtol=0, atol=_tolerance(dtype, twin))
        model.set_weight_layout("in_out")  # and back, exactly
        assert model.weight_layout == "in_out"
        if not unstack:
            np.testing.assert_array_equal(np.asarray(model(tokens), np.float32), twin)


def test_int8_product_equals_dequantized_weight():
    """The int8 path scales the product instead of the weight: the same math as x @ dequantize(q)."""
    model = _model("int8")
    tokens = jnp.asarray([[3, 1, 4, 1, 5, 9, 2, 6]])
    ref = _model("int8")
    for _, var in ref._matmul_params():
        var.set_value(var.get_value().dequantize())
    ref.embedder.embedding.set_value(ref.embedder.embedding.get_value().dequantize())
    expect = np.asarray(ref(tokens))
    np.testing.assert_allclose(np.asarray(model(tokens)), expect, rtol=0, atol=_tolerance("int8", expect))


def test_layout_errors_and_checkpoint_form(tmp_path):
    model = _model("float32")
    with pytest.raises(ValueError, match="weight layout"):
        model.set_weight_layout("row_major")
    assert WEIGHT_LAYOUTS == ("in_out", "out_in")
    tokens = jnp.asarray([[5, 6, 7]])
    expect = np.asarray(model(tokens))
    model.unstack_layers()
    model.set_weight_layout("out_in")
    path = checkpoint.save(tmp_path / "ckpt", model)  # saved in the checkpoint's form ...
    assert not model.is_stacked and model.weight_layout == "out_in"  # ... and the model left as it was
    again = checkpoint.load(path)
    assert again.weight_layout == "in_out" and again.is_stacked
    np.testing.assert_array_equal(np.asarray(again(tokens)), expect)


def test_decode_layout_is_chosen_per_backend_and_dtype(monkeypatch):
    # float32: "out_in" where the CPU kernels serve it, else XLA's float32 dot on the checkpoint's layout
    f32 = {"unstack": True, "weight_layout": "out_in" if cpu_kernels.available() else "in_out", "compiler_options": {}}
    assert decode_layout(jnp.float32, "cpu") == f32
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    assert decode_layout(jnp.float32, "cpu")["weight_layout"] == "in_out"
    assert decode_layout(jnp.float32, "gpu") == {"unstack": False, "weight_layout": "in_out", "compiler_options": {}}
    for dt in (jnp.bfloat16, jnp.int8):
        assert decode_layout(dt, "cpu") == {
            "unstack": True,
            "weight_layout": "out_in",
            "compiler_options": {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"},
        }
        other = {"unstack": False, "weight_layout": "in_out", "compiler_options": {}}
        assert decode_layout(dt, "gpu") == decode_layout(dt, "tpu") == other


@pytest.mark.parametrize("dtype", DTYPES)
def test_engine_greedy_tokens_equal_naive_twin(dtype):
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7]]
    fast = Engine(_model(dtype), max_length=64)  # the backend's choice
    twin = Engine(_model(dtype), max_length=64, unstack=False, weight_layout="in_out")
    a = fast.generate(prompts, max_new_tokens=12)
    b = twin.generate(prompts, max_new_tokens=12)
    # bfloat16 logits carry ~3 significant digits: the two may part at a tie within that rounding (shown by the
    # reference forward's logits of both tokens); float32 and int8 must agree exactly
    tie = 0.05 if dtype == "bfloat16" else 0.0
    reference = _model(dtype)
    for prompt, x, y in zip(prompts, a, b, strict=True):
        n = next((i for i, (s, t) in enumerate(zip(x.tokens, y.tokens, strict=True)) if s != t), len(x.tokens))
        if n < len(x.tokens):
            logits = np.asarray(reference(jnp.asarray([prompt + x.tokens[:n]])), np.float32)[0, -1]
            gap = abs(float(logits[x.tokens[n]] - logits[y.tokens[n]]))
            assert gap <= tie, f"token {n}: {x.tokens[n]} vs {y.tokens[n]}, logit gap {gap} is no tie"
        assert x.tokens == y.tokens or tie
        np.testing.assert_allclose(x.logprobs[:n], y.logprobs[:n], atol=0.05 if dtype == "bfloat16" else 1e-4)


# ------------------------------------------------------------------------------------------------ compiled HLO
_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\w+)\[([\d,]*)\]\{[^}]*\} (\w+)\(")


def _big_outputs(hlo: str, sizes: set[int]) -> list[str]:
    """Instructions that materialize an array with as many elements as a weight: those of every computation that
    is not a fusion body (the entry, while-loop bodies of a scan, ...), parameters and views excepted."""
    fused = set(re.findall(r" fusion\(.*calls=%([\w.\-]+)", hlo))
    bad, inside_fusion = [], False
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%([\w.\-]+) .*\{$", line)
        if header:
            inside_fusion = header.group(1) in fused
            continue
        m = _INSTR.match(line)
        if inside_fusion or not m or m.group(4) in ("parameter", "bitcast", "get-tuple-element", "tuple"):
            continue
        numel = int(np.prod([int(d) for d in m.group(3).split(",") if d] or [1]))
        if numel in sizes:
            bad.append(line.strip()[:200])
    return bad


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU decode layout")
@pytest.mark.parametrize("kernels", [True, False], ids=["cpu_kernels", "xla_products"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_decode_step_reads_weights_as_stored(dtype, kernels, monkeypatch):
    """SmolLM2-shaped layers (D 576, F 1536, 9/3 heads): no instruction of the compiled decode step writes an array
    the size of a weight (a float copy of a bf16/int8 weight, or a layer slice of a stacked one), while the naive
    twin (stacked, "in_out") does, which shows the check sees such copies. With the CPU kernels
    (:mod:`llama_jax.cpu_kernels`) every product (float32 too) is their custom call; without them, XLA's."""
    if kernels and not cpu_kernels.available():
        pytest.skip("no C++ compiler here to build llama_jax.cpu_kernels")
    if not kernels:
        monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    cfg = tiny_config(
        vocab_size=1000,
        dim=576,
        n_layers=2,
        n_heads=9,
        n_kv_heads=3,
        hidden_dim=1536,
        max_seq_len=64,
        tie_word_embeddings=True,
    )

    def hlo(engine, program="step", compiler_options=None):
        ds = engine.start([[1, 2, 3]], max_new_tokens=4)
        if program == "step":
            lowered = engine._decode_step.lower(engine.params, ds, SamplingMode())
        elif program == "loop":  # Engine.loop: a while loop over steps, where a weight cast is loop-invariant
            lowered = engine._decode_loop.lower(engine.params, ds, SamplingMode())
        else:  # Engine.steps
            lowered = engine._decode_steps.lower(engine.params, ds, SamplingMode(), 3)
        return lowered.compile(compiler_options).as_text() if compiler_options else lowered.compile().as_text()

    model = _model(dtype, cfg)
    per_layer = {int(np.prod(w.shape)) // cfg.n_layers for _, w in model._matmul_params()}  # stacked [L, ...]
    sizes = per_layer | {cfg.n_layers * s for s in per_layer} | {cfg.vocab_size * cfg.dim}
    fast_engine = Engine(model, max_length=64)
    for program in ("step", "loop", "steps"):
        text = hlo(fast_engine, program)
        fast = _big_outputs(text, sizes)
        assert not fast, f"{program}:\n" + "\n".join(fast)
        calls = len(re.findall(r'custom_call_target="llama_jax_matvec_', text))
        # 7 products per layer and the tied head, in the loop body (the step program) or the loop's
        assert calls == (7 * cfg.n_layers + 1 if kernels else 0), (program, calls)
    twin = _big_outputs(hlo(Engine(_model(dtype, cfg), max_length=64, unstack=False, weight_layout="in_out")), sizes)
    if dtype != "float32":
        assert twin, "the naive twin should copy its bf16/int8 weights to float (the check would be blind)"
    if dtype != "float32" and not kernels:
        # and the loop check sees a cast hoisted out of the loop: XLA's default pipeline writes the copies
        hoisted = _big_outputs(hlo(fast_engine, "loop", {"xla_disable_hlo_passes": ""}), sizes)
        assert hoisted, "with loop-invariant code motion on, the decode loop should hoist float weight copies"


# ------------------------------------------------------------------------------------------------ SmolLM2
@pytest.mark.parametrize("dtype", DTYPES)
def test_smollm2_greedy_equals_naive_twin(smollm2_checkpoint, dtype):
    from llama_jax.tokenizer import Tokenizer

    prompt = Tokenizer.from_file(checkpoint.tokenizer_dir(smollm2_checkpoint)).encode(
        "The capital of France is", bos=True
    )

    def load():
        if dtype == "int8":
            return quant.load(smollm2_checkpoint, "int8")
        return checkpoint.load(smollm2_checkpoint, dtype=jnp.dtype(dtype))

    (a,) = Engine(load(), max_length=64).generate([prompt], max_new_tokens=10)
    twin = Engine(load(), max_length=64, unstack=False, weight_layout="in_out")
    (b,) = twin.generate([prompt], max_new_tokens=10)
    if a.tokens != b.tokens:  # only at a near tie: closer than the two layouts' rounding can separate
        step = next(i for i, (x, y) in enumerate(zip(a.tokens, b.tokens, strict=True)) if x != y)
        logits = np.asarray(twin.model(jnp.asarray([prompt + b.tokens[:step]]))[0, -1], np.float32)
        # bfloat16: the compute dtype's rounding (_tolerance); float32 / int8: float32 at SmolLM2's D 576, L 30
        tie = 2 * (_tolerance(dtype, logits) if dtype == "bfloat16" else logits_tolerance(logits, 576, 30))
        top = np.sort(logits)[-2:]
        assert top[1] - top[0] <= tie, (step, a.tokens, b.tokens, top, tie)
        assert logits[a.tokens[step]] >= top[1] - tie, "the layout's token is not one of the tied pair"


def test_smollm2_int8_perplexity_within_one_percent_in_decode_layout(smollm2_checkpoint):
    sys.path.insert(0, os.path.join(REPO, "experiments"))
    import eval as ev

    text = open(os.path.join(REPO, "tests", "data", "eval_text.txt")).read()
    model, tok = ev.load_model(smollm2_checkpoint)
    ids = tok.encode(text, bos=True)
    p32 = ev.perplexity(ev.Scorer(model), ids, 128, 64)["perplexity"]
    del model
    q8, _ = ev.load_model(smollm2_checkpoint, quant="int8")
    q8.unstack_layers()
    q8.set_weight_layout(decode_layout(jnp.int8, "cpu")["weight_layout"])
    p8 = ev.perplexity(ev.Scorer(q8), ids, 128, 64)["perplexity"]
    print(f"SmolLM2 perplexity float32 {p32:.4f}, int8 (out_in) {p8:.4f} ({(p8 / p32 - 1) * 100:+.2f}%)")
    assert abs(p8 / p32 - 1) <= 0.01


# ------------------------------------------------------------------------------------------------ 16-bit caches
def test_bf16_cache_write_is_exact_and_never_widens_the_cache():
    """kv_cache.scatter_set moves a bf16 cache's bits (an exact copy of .at[].set, out-of-range slots dropped), and
    the compiled write holds no float32 array the size of the cache (XLA:CPU's bf16 scatter converts the whole
    buffer to float32 and back, which the plain .at[].set shows, so the check is not blind)."""
    from llama_jax.kv_cache import scatter_set

    shape = (2, 3, 16, 2, 8)  # [L, B, S, K, H]
    rng = np.random.default_rng(0)
    buf = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    new = jnp.asarray(rng.standard_normal((3, 2, 2, 8)), jnp.float32)  # [B, T, K, H], cast to bf16 on write
    rows = jnp.arange(3)[:, None]
    positions = jnp.asarray([[0, 1], [7, 8], [15, 16]], jnp.int32)  # slot 16 is past the cache: dropped
    index = (1, rows, positions)
    ours = scatter_set(buf, index, new)
    plain = buf.at[index].set(new.astype(jnp.bfloat16), mode="drop")
    assert ours.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(jax.lax.bitcast_convert_type(ours, jnp.uint16)),
        np.asarray(jax.lax.bitcast_convert_type(plain, jnp.uint16)),
    )
    widened = re.compile(r"f32\[" + ",".join(map(str, shape)) + r"\]")

    def hlo(write):
        return jax.jit(write).lower(buf, new).compile().as_text()

    assert not widened.search(hlo(lambda b, x: scatter_set(b, index, x)))
    if jax.default_backend() == "cpu":
        assert widened.search(hlo(lambda b, x: b.at[index].set(x.astype(b.dtype), mode="drop")))
