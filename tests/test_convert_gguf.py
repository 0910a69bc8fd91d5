"""GGUF -> llama-jax: SmolLM2-135M (real Q8_0/Q4_1 file) against transformers' dequantization; bad inputs."""

import os
import subprocess
import sys

import numpy as np
import pytest

from llama_jax import assets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = [1, 504, 3458, 282, 4649, 314, 2114, 30, 216, 28, 12, 9, 1000, 2000, 300]


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "conversions", "--noprogress", *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=600)


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
    assert tok.encode("The capital of France")[-4:] == Tokenizer.from_file(gguf_path).encode(
        "The capital of France")[-4:]

    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path),
                                              dtype=torch.float32)
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPT])).logits.numpy()
    ours = np.asarray(checkpoint.load(out, dtype=jnp.float32)(jnp.array([PROMPT], jnp.int32)))
    diff = np.abs(ours - ref)
    print(f"SmolLM2 GGUF logits: max abs diff {diff.max():.3g}, relative to max |logit| "
          f"{diff.max() / np.abs(ref).max():.3g}")
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def _tiny_gguf(path, qtype_name="Q8_0"):
    """A 1-layer Llama GGUF with all weight matrices of type ``qtype_name`` (raw bytes, valid sizes)."""
    import gguf
    w = gguf.GGUFWriter(str(path), "llama")
    d, f, v, n, k = 64, 128, 256, 4, 2
    w.add_block_count(1)
    w.add_context_length(256)
    w.add_embedding_length(d)
    w.add_feed_forward_length(f)
    w.add_head_count(n)
    w.add_head_count_kv(k)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    rng = np.random.default_rng(0)
    qtype = gguf.GGMLQuantizationType[qtype_name]
    shapes = {"token_embd.weight": (v, d), "output_norm.weight": (d,), "output.weight": (v, d),
              "blk.0.attn_norm.weight": (d,), "blk.0.ffn_norm.weight": (d,),
              "blk.0.attn_q.weight": (d, d), "blk.0.attn_k.weight": (k * 16, d), "blk.0.attn_v.weight": (k * 16, d),
              "blk.0.attn_output.weight": (d, d), "blk.0.ffn_gate.weight": (f, d), "blk.0.ffn_up.weight": (f, d),
              "blk.0.ffn_down.weight": (d, f)}
    for name, shape in shapes.items():
        x = rng.standard_normal(shape).astype(np.float32)
        if len(shape) == 1 or qtype_name == "F32":
            w.add_tensor(name, x)
        else:
            block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
            raw = rng.integers(0, 255, (shape[0], shape[1] // block * nbytes), dtype=np.uint8)
            w.add_tensor(name, raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_tiny_gguf_q8_converts(tmp_path):
    from conversions.gguf import GGUFSource
    _tiny_gguf(tmp_path / "t.gguf", "Q8_0")
    src = GGUFSource(str(tmp_path / "t.gguf"))
    assert (src.config.n_kv_heads, src.config.head_dim, src.config.tie_word_embeddings) == (2, 16, False)


def test_unknown_gguf_tensor_type_refused(tmp_path):
    _tiny_gguf(tmp_path / "bad.gguf", "Q2_K")
    r = _cli("--source=gguf", f"--input={tmp_path / 'bad.gguf'}", f"--output={tmp_path / 'out'}")
    assert r.returncode != 0
    assert "bad.gguf" in r.stderr and "Q2_K" in r.stderr and "not supported" in r.stderr, r.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == ["bad.gguf"]
