"""Shared test helpers: tiny configs, and our parameters exported to a Hugging Face PyTorch model."""

from __future__ import annotations

import numpy as np
from flax import nnx

from conversions import layout
from llama_jax.config import LlamaConfig, RopeScaling


def tiny_config(**changes) -> LlamaConfig:
    base = dict(vocab_size=256, dim=64, n_layers=2, n_heads=8, n_kv_heads=2, hidden_dim=160, norm_eps=1e-5,
                rope_theta=10000.0, max_seq_len=131072)
    base.update(changes)
    return LlamaConfig(**base)


def randomize(model, seed: int = 0, std: float = 0.08):
    """Gives every parameter (norm scales included: around 1) random values, so no term of the math is trivial."""
    rng = np.random.default_rng(seed)
    for path, var in list(nnx.iter_graph(model)):
        if isinstance(var, nnx.Param):
            if path[-1] == "scale":
                value = 1.0 + 0.1 * rng.standard_normal(var.shape)
            else:
                value = std * rng.standard_normal(var.shape)
            var.set_value(np.asarray(value, np.float32).astype(var.dtype))
    return model


def hf_state_dict(model) -> dict[str, np.ndarray]:
    """Our parameters as a Hugging Face ``LlamaForCausalLM`` state dict (numpy, float32)."""
    c = model.config
    if not model.is_stacked:
        raise ValueError("stack the layers first")
    params = {path: var for path, var in nnx.iter_graph(model) if isinstance(var, nnx.Param)}
    get = lambda *path: np.asarray(params[path][...], np.float32)
    out = {"model.embed_tokens.weight": get("embedder", "embedding"), "model.norm.weight": get("final_norm", "scale")}
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = layout.transpose(get("lm_head"))
    for i in range(c.n_layers):
        pre = f"model.layers.{i}."
        L = lambda *path: get("layers", *path)[i]
        out[pre + "self_attn.q_proj.weight"] = layout.heads_out(L("attention", "q_proj"))
        out[pre + "self_attn.k_proj.weight"] = layout.heads_out(L("attention", "k_proj"))
        out[pre + "self_attn.v_proj.weight"] = layout.heads_out(L("attention", "v_proj"))
        out[pre + "self_attn.o_proj.weight"] = layout.o_out(L("attention", "o_proj"))
        out[pre + "mlp.gate_proj.weight"] = layout.transpose(L("mlp", "gate_proj"))
        out[pre + "mlp.up_proj.weight"] = layout.transpose(L("mlp", "up_proj"))
        out[pre + "mlp.down_proj.weight"] = layout.transpose(L("mlp", "down_proj"))
        out[pre + "input_layernorm.weight"] = L("attention_norm", "scale")
        out[pre + "post_attention_layernorm.weight"] = L("ffn_norm", "scale")
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def hf_model(model):
    """A transformers ``LlamaForCausalLM`` (float32, eval mode) holding our parameters."""
    import torch
    import transformers

    hf_config = transformers.LlamaConfig(**model.config.to_hf_config())
    hf = transformers.LlamaForCausalLM(hf_config).float().eval()
    sd = {k: torch.from_numpy(v) for k, v in hf_state_dict(model).items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not (model.config.tie_word_embeddings and m == "lm_head.weight")]
    assert not missing and not unexpected, (missing, unexpected)
    if model.config.tie_word_embeddings:
        hf.tie_weights()
    return hf


LLAMA31_SCALING = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192)


def meta_state_dict(model) -> dict[str, np.ndarray]:
    """Our parameters as Meta's ``consolidated.00.pth`` state dict (interleaved RoPE rows for wq / wk)."""
    c = model.config
    hf = hf_state_dict(model)
    out = {"tok_embeddings.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"],
           "output.weight": hf.get("lm_head.weight", hf["model.embed_tokens.weight"])}
    names = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
             "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
             "mlp.down_proj": "feed_forward.w2", "input_layernorm": "attention_norm",
             "post_attention_layernorm": "ffn_norm"}
    for i in range(c.n_layers):
        for ours, meta in names.items():
            w = hf[f"model.layers.{i}.{ours}.weight"]
            if meta == "attention.wq":
                w = layout.half_split_to_interleaved(w, c.n_heads)
            elif meta == "attention.wk":
                w = layout.half_split_to_interleaved(w, c.n_kv_heads)
            out[f"layers.{i}.{meta}.weight"] = np.ascontiguousarray(w)
    return out
