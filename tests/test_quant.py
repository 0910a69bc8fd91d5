"""llama_jax.quant: int8 weight-only quantization with per-output-channel scales.

Invariants on a small random model (error bound per channel, Orbax round trip keeps int8, unstacked == stacked,
engine decoding), and on SmolLM2: parameter bytes ~ 1/4 of float32, perplexity within 2% of float.
"""

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax import quant
from llama_jax.config import LlamaConfig
from llama_jax.model import Llama
from tests.conftest import REPO, run_cli
from tests.numerics import assert_logits_close

CFG = LlamaConfig(
    vocab_size=96,
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    hidden_dim=128,
    head_dim=16,
    norm_eps=1e-5,
    rope_theta=10000.0,
    rope_scaling=None,
    max_seq_len=64,
    tie_word_embeddings=False,
)


def _model(cfg=CFG):
    return Llama(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.float32)


def test_quantize_array_error_bound_and_channels():
    w = jax.random.normal(jax.random.key(1), (3, 8, 5)) * jnp.arange(1, 6)  # per-channel ranges differ
    qa = quant.quantize_array(w, (0, 1))
    assert qa.q.dtype == jnp.int8 and qa.scale.shape == (1, 1, 5) and qa.scale.dtype == w.dtype
    np.testing.assert_allclose(qa.scale[0, 0], jnp.max(jnp.abs(w), axis=(0, 1)) / 127, rtol=1e-6)
    err = jnp.abs(qa.dequantize() - w)
    assert bool(jnp.all(err <= qa.scale / 2 + 1e-7))
    assert int(jnp.max(jnp.abs(qa.q))) == 127


def test_quantized_model_forward_close_and_layouts_agree(tmp_path):
    model = _model()
    tokens = jnp.array([[1, 5, 9, 17, 33, 2, 70, 4]])
    ref = model(tokens)
    b32 = quant.param_bytes(model)
    quant.quantize_model(model)
    state = nnx.state(model, nnx.Param)
    names = {
        "/".join(map(str, p))
        for p, v in jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
        if isinstance(v.get_value(), quant.QArray)
    }
    assert len(names) == 9 and not any("norm" in n for n in names)  # 7 matmuls + emb + lm_head
    out = model(tokens)
    rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    assert 0 < rel < 0.02, rel
    assert quant.param_bytes(model) < 0.3 * b32
    model.unstack_layers()
    assert_logits_close(model(tokens), out, CFG.dim, CFG.n_layers, "int8 unstacked")  # other fusion: rounding at D, L

    path = quant.save(tmp_path / "q", model)
    assert quant.stored_quant(path) == "int8"
    again = quant.load(path, quant="int8")
    leaves = jax.tree.leaves(nnx.state(again, nnx.Param))
    assert sum(x.dtype == jnp.int8 for x in leaves) == 9
    np.testing.assert_array_equal(again(tokens), out)
    deq = quant.load(path, quant="none")
    assert not quant.is_quantized(deq)
    assert_logits_close(deq(tokens), out, CFG.dim, CFG.n_layers, "dequantized")  # q * scale, rounding at D, L
    with pytest.raises(ValueError, match="--quant"):
        quant.load(path, quant="int4")


def test_embeddings_optional_and_engine_decodes():
    from llama_jax.engine import Engine

    model = _model(dataclasses.replace(CFG, tie_word_embeddings=True))
    ref = _model(model.config)
    quant.quantize_model(model, embeddings=False)
    assert not isinstance(model.embedder.embedding.get_value(), quant.QArray)
    quant.quantize_model(ref)
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11]]
    a = Engine(model, max_length=32).generate(prompts, max_new_tokens=5)
    b = Engine(ref, max_length=32).generate(prompts, max_new_tokens=5)
    assert all(len(c.tokens) == 5 for c in a + b)


def test_abstract_quantized_state_matches_concrete():
    abstract = nnx.eval_shape(lambda: _model())
    abs_q = quant.abstract_quantized_state(nnx.state(abstract, nnx.Param))
    model = quant.quantize_model(_model())
    conc = nnx.state(model, nnx.Param)
    shapes = lambda t: [(x.shape, jnp.dtype(x.dtype)) for x in jax.tree.leaves(t)]  # noqa: E731
    assert shapes(abs_q) == shapes(conc)
    assert quant.param_bytes(abs_q) == quant.param_bytes(conc)


def test_smollm2_int8_bytes_and_perplexity(smollm2_checkpoint):
    sys.path.insert(0, os.path.join(REPO, "experiments"))
    import eval as ev

    text = open(os.path.join(REPO, "tests", "data", "eval_text.txt")).read()
    model, tok = ev.load_model(smollm2_checkpoint)
    ids = tok.encode(text, bos=True)
    b32 = quant.param_bytes(model)
    assert b32 == 4 * model.num_params()
    p32 = ev.perplexity(ev.Scorer(model), ids, 128, 64)["perplexity"]
    del model
    q8, _ = ev.load_model(smollm2_checkpoint, quant="int8")
    b8 = quant.param_bytes(q8)
    p8 = ev.perplexity(ev.Scorer(q8), ids, 128, 64)["perplexity"]
    print(
        f"SmolLM2 params: float32 {b32 / 2**20:.1f} MiB, int8 {b8 / 2**20:.1f} MiB (x{b8 / b32:.3f}); "
        f"perplexity float32 {p32:.4f}, int8 {p8:.4f} ({(p8 / p32 - 1) * 100:+.2f}%)"
    )
    assert 0.24 < b8 / b32 < 0.27
    assert p8 <= 1.02 * p32


def test_generate_cli_int8(smollm2_checkpoint, tmp_path):
    saved = quant.save(
        tmp_path / "smol-int8",
        quant.load(smollm2_checkpoint, quant="int8"),
        tokenizer_files=[os.path.join(smollm2_checkpoint, "tokenizer")],
    )
    r = run_cli(
        "llama_jax.generate",
        f"--checkpoint={saved}",
        "--quant=int8",
        "--chat",
        "--max_new_tokens=8",
        "--prompt=What is the capital of France?",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert len(os.listdir(os.path.join(saved, "params"))) > 0
