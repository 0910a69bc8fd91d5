"""GGUF -> llama-jax: SmolLM2-135M (real Q8_0/Q4_1 file) against transformers' dequantization; bad inputs."""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest

from llama_jax import assets
from tests.numerics import assert_logits_close, exceeds_tolerance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = [1, 504, 3458, 282, 4649, 314, 2114, 30, 216, 28, 12, 9, 1000, 2000, 300]


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, "-m", "conversions", "--noprogress", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )


def test_smollm2_gguf_logits_match_transformers(tmp_path):
    import jax.numpy as jnp
    import torch
    from transformers import AutoModelForCausalLM

    from conversions.__main__ import convert_from_flags
    from llama_jax import checkpoint
    from llama_jax.tokenizer import Tokenizer

    gguf_path = assets.smollm2_gguf_path()
    out = convert_from_flags("gguf", gguf_path, str(tmp_path / "smol"), progress=False)
    cfg = checkpoint.read_config(out)
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.tie_word_embeddings) == (30, 576, 9, 3, True)
    assert cfg.rope_theta == 100000.0
    tok = Tokenizer.from_file(checkpoint.tokenizer_dir(out))
    assert (
        tok.encode("The capital of France")[-4:] == Tokenizer.from_file(gguf_path).encode("The capital of France")[-4:]
    )

    hf = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=torch.float32
    )
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPT])).logits.numpy()
    tokens = jnp.array([PROMPT], jnp.int32)
    ours = np.asarray(checkpoint.load(out, dtype=jnp.float32)(tokens))
    # float32 rounding at depth 30, width 576 (tests/numerics.py): 6.3e-5 of max |logit|
    assert_logits_close(ours, ref, cfg.dim, cfg.n_layers, "SmolLM2 GGUF logits vs transformers")

    # ... and the bound still catches real bugs: the smallest of the perturbations measured (one layer's q_proj off
    # by 1e-3 relative, 1.2e-4 of max |logit|) and RoPE theta off by 1%.
    model = checkpoint.load(out, dtype=jnp.float32)
    q = model.layers.attention.q_proj
    noise = 1 + 1e-3 * np.random.default_rng(0).standard_normal(q[...].shape[1:])
    q.set_value(q[...].at[cfg.n_layers - 1].multiply(jnp.asarray(noise, jnp.float32)))
    assert exceeds_tolerance(np.asarray(model(tokens)), ref, cfg.dim, cfg.n_layers), "q_proj * (1 + 1e-3 N)"
    model = checkpoint.load(out, dtype=jnp.float32)
    model.layers.attention.config = dataclasses.replace(cfg, rope_theta=cfg.rope_theta * 1.01)
    assert exceeds_tolerance(np.asarray(model(tokens)), ref, cfg.dim, cfg.n_layers), "rope_theta * 1.01"


def _tiny_gguf(path, qtype_name="Q8_0", d=64, rope_freqs=None, head_count=None, rope_dimension_count=None):
    """A 1-layer Llama GGUF whose weight matrices are of type ``qtype_name``: quantized from random floats where
    the gguf package can quantize, else random bytes of the right block size. Returns {name: float source}."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    f, v, n, k, h = 256, 256, 4, 2, d // 4
    w.add_block_count(1)
    w.add_context_length(256)
    w.add_embedding_length(d)
    w.add_feed_forward_length(f)
    w.add_head_count(n if head_count is None else head_count)
    if rope_dimension_count is not None:
        w.add_rope_dimension_count(rope_dimension_count)
    w.add_head_count_kv(k)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    rng = np.random.default_rng(0)
    qtype = gguf.GGMLQuantizationType[qtype_name]
    shapes = {
        "token_embd.weight": (v, d),
        "output_norm.weight": (d,),
        "output.weight": (v, d),
        "blk.0.attn_norm.weight": (d,),
        "blk.0.ffn_norm.weight": (d,),
        "blk.0.attn_q.weight": (n * h, d),
        "blk.0.attn_k.weight": (k * h, d),
        "blk.0.attn_v.weight": (k * h, d),
        "blk.0.attn_output.weight": (d, n * h),
        "blk.0.ffn_gate.weight": (f, d),
        "blk.0.ffn_up.weight": (f, d),
        "blk.0.ffn_down.weight": (d, f),
    }
    floats = {}
    for name, shape in shapes.items():
        x = rng.standard_normal(shape).astype(np.float32)
        floats[name] = x
        if len(shape) == 1 or qtype_name == "F32":
            w.add_tensor(name, x)
            continue
        try:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
        except NotImplementedError:
            block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
            raw = rng.integers(0, 255, (shape[0], shape[1] // block * nbytes), dtype=np.uint8)
            # random bytes can make an fp16 block scale inf/NaN, which the converter rightly refuses: redraw those rows
            with np.errstate(all="ignore"):
                while not (ok := np.isfinite(gguf.quants.dequantize(raw, qtype)).all(axis=1)).all():
                    raw[~ok] = rng.integers(0, 255, raw[~ok].shape, dtype=np.uint8)
            w.add_tensor(name, raw, raw_dtype=qtype)
            floats[name] = None
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return floats


TOLERANCE = {"F32": 0, "F16": 2e-3, "BF16": 2e-2, "Q8_0": 3e-2, "Q4_0": 0.6, "Q4_1": 0.5}


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"])
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")  # gguf's K-quant reference
def test_gguf_tensor_types_and_rope_layout(tmp_path, qtype):
    """Every supported type converts; q/k rows are moved from interleaved to half-split order (checked with an
    index formula written independently of conversions.layout), values match gguf's dequantization and, where the
    source floats are known, the floats within the quantization error."""
    import gguf

    from conversions.common import convert
    from conversions.gguf import GGUFSource
    from llama_jax import checkpoint

    floats = _tiny_gguf(tmp_path / "t.gguf", qtype, d=256)
    out = convert(GGUFSource(str(tmp_path / "t.gguf")), str(tmp_path / "out"), progress=False)
    cfg = checkpoint.read_config(out)
    assert (cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden_dim) == (256, 4, 2, 64, 256)
    reader = gguf.GGUFReader(str(tmp_path / "t.gguf"))
    t = {x.name: x for x in reader.tensors}
    for key, name, heads in (
        ("blk.0.attn_q.weight", "layers.attention.q_proj", 4),
        ("blk.0.attn_k.weight", "layers.attention.k_proj", 2),
    ):
        deq = gguf.quants.dequantize(t[key].data, t[key].tensor_type).reshape(heads * 64, 256)
        ours = checkpoint.read_param(out, name, layer=0)  # [D, heads, H]
        expect = np.empty_like(ours)
        for hd in range(heads):
            for i in range(32):
                for j in range(2):
                    expect[:, hd, j * 32 + i] = deq[hd * 64 + 2 * i + j]
        np.testing.assert_array_equal(ours, expect, err_msg=key)
        if floats[key] is not None:
            src = floats[key].reshape(heads, 32, 2, 256)
            np.testing.assert_allclose(ours[:, :, :32], src[:, :, 0].transpose(2, 0, 1), atol=TOLERANCE[qtype])
    emb = checkpoint.read_param(out, "embedder.embedding")
    np.testing.assert_array_equal(
        emb, gguf.quants.dequantize(t["token_embd.weight"].data, t["token_embd.weight"].tensor_type).reshape(256, 256)
    )


def test_gguf_llama31_rope_freqs(tmp_path):
    from conversions.gguf import GGUFSource
    from llama_jax.config import RopeScaling
    from llama_jax.rope import inverse_frequencies

    s = RopeScaling()
    factors = inverse_frequencies(16, 10000.0) / inverse_frequencies(16, 10000.0, s)
    _tiny_gguf(tmp_path / "r.gguf", "F32", rope_freqs=factors)
    assert GGUFSource(str(tmp_path / "r.gguf")).config.rope_scaling == s
    _tiny_gguf(tmp_path / "bad.gguf", "F32", rope_freqs=factors * 1.5)
    with pytest.raises(ValueError, match="bad.gguf: rope_freqs.weight does not match"):
        GGUFSource(str(tmp_path / "bad.gguf"))


def test_tiny_gguf_q8_converts(tmp_path):
    from conversions.gguf import GGUFSource

    _tiny_gguf(tmp_path / "t.gguf", "Q8_0")
    src = GGUFSource(str(tmp_path / "t.gguf"))
    assert (src.config.n_kv_heads, src.config.head_dim, src.config.tie_word_embeddings) == (2, 16, False)


def test_unknown_gguf_tensor_type_refused(tmp_path):
    _tiny_gguf(tmp_path / "bad.gguf", "Q2_K", d=256)
    r = _cli("--source=gguf", f"--input={tmp_path / 'bad.gguf'}", f"--output={tmp_path / 'out'}")
    assert r.returncode != 0
    assert "bad.gguf" in r.stderr and "Q2_K" in r.stderr and "not supported" in r.stderr, r.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == ["bad.gguf"]
