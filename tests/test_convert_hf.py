"""Hugging Face <-> llama-jax: transformers save_pretrained checkpoints convert with logits parity, and export
back bitwise (transformers loads the export)."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conversions.__main__ import convert_from_flags
from llama_jax import checkpoint
from tests.numerics import assert_logits_close

TOKENS = [[1, 5, 9, 200, 3, 7, 11, 2, 100, 17, 4, 250]]


def _hf_model(tmp_path, tied, shard=False, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    rope = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
        "rope_theta": 500000.0,
    }
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=None if tied else rope,
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # non-trivial norm scales, so a swapped norm would show
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    d = tmp_path / ("hf_tied" if tied else "hf")
    model.save_pretrained(d, max_shard_size="40KB" if shard else "5GB")
    with torch.no_grad():
        ref = model(torch.tensor(TOKENS)).logits.numpy()
    return str(d), ref


def _hf_tensors(d):
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(d, f)))
    return out


@pytest.mark.parametrize("tied,shard", [(False, True), (True, False)], ids=["gqa_llama3_rope_sharded", "tied"])
def test_hf_convert_logits_and_round_trip(tmp_path, tied, shard):
    from transformers import AutoModelForCausalLM

    src, ref = _hf_model(tmp_path, tied, shard)
    if shard:
        assert os.path.exists(os.path.join(src, "model.safetensors.index.json"))
    out = convert_from_flags("hf", src, str(tmp_path / "ours"), progress=False)
    cfg = checkpoint.read_config(out)
    assert cfg.tie_word_embeddings == tied and (cfg.rope_scaling is None) == tied
    ours = np.asarray(checkpoint.load(out, dtype=jnp.float32)(jnp.array(TOKENS, jnp.int32)))
    assert_logits_close(ours, ref, cfg.dim, cfg.n_layers, f"HF tied={tied}")  # float32 rounding at D, L

    back = convert_from_flags("orbax", out, str(tmp_path / "back"), target="hf", progress=False)
    a, b = _hf_tensors(src), _hf_tensors(back)
    if tied:
        a.pop("lm_head.weight", None)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    reloaded = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32).eval()
    with torch.no_grad():
        np.testing.assert_array_equal(reloaded(torch.tensor(TOKENS)).logits.numpy(), ref)


def test_hf_export_shards_and_bfloat16(tmp_path):
    from conversions.export import export_hf

    src, _ = _hf_model(tmp_path, tied=False)
    out = convert_from_flags("hf", src, str(tmp_path / "ours"), dtype="bfloat16", progress=False)
    assert str(checkpoint.stored_dtype(out)) == "bfloat16"
    back = export_hf(out, str(tmp_path / "back"), progress=False, max_shard_bytes=40000)
    files = sorted(f for f in os.listdir(back) if f.endswith(".safetensors"))
    assert len(files) > 1 and all(os.path.getsize(os.path.join(back, f)) <= 40000 + 4000 for f in files)
    b = _hf_tensors(back)
    for k, v in _hf_tensors(src).items():
        assert b[k].dtype == torch.bfloat16 and torch.equal(b[k], v.to(torch.bfloat16)), k
