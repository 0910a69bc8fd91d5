"""Shared test helpers: tiny configs, and our parameters exported to a Hugging Face PyTorch model."""

from __future__ import annotations

import numpy as np
from flax import nnx

from conversions import layout
from llama_jax.config import LlamaConfig, RopeScaling


def tiny_config(**changes) -> LlamaConfig:
    base = dict(
        vocab_size=256,
        dim=64,
        n_layers=2,
        n_heads=8,
        n_kv_heads=2,
        hidden_dim=160,
        norm_eps=1e-5,
        rope_theta=10000.0,
        max_seq_len=131072,
    )
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


def _flat(params, prefix=""):
    """{"layers": {"attention": {"q_proj": a}}} -> {"layers.attention.q_proj": a} (numpy)."""
    out = {}
    for k, v in params.items():
        name = f"{prefix}{k}"
        out.update(_flat(v, name + ".") if isinstance(v, dict) else {name: np.asarray(v, np.float32)})
    return out


def to_torch_state_dict(params: dict, config, keys: dict[str, str]) -> dict[str, np.ndarray]:
    """Stacked llama-jax parameters (a pure dict) -> a PyTorch-layout state dict, through the converter's own
    tables: ``keys`` maps our names to torch keys (``conversions.hf.OURS_TO_HF`` or ``conversions.meta.OURS_TO_META``,
    ``{i}`` for the layer), ``conversions.layout.ours_to_torch`` does the layout."""
    out = {}
    for name, w in _flat(params).items():
        if name.startswith("layers."):
            for i in range(config.n_layers):
                out[keys[name].format(i=i)] = layout.ours_to_torch(name, w[i], config)
        else:
            out[keys[name]] = layout.ours_to_torch(name, w, config)
    return out


def from_torch_state_dict(sd: dict[str, np.ndarray], config, keys: dict[str, str]) -> dict[str, np.ndarray]:
    """Inverse of :func:`to_torch_state_dict`, flat: {"layers.attention.q_proj": [L, D, N, H], ...}."""
    out = {}
    for name, key in keys.items():
        if name.startswith("layers."):
            out[name] = np.stack(
                [layout.torch_to_ours(name, sd[key.format(i=i)], config) for i in range(config.n_layers)]
            )
        elif key in sd:
            out[name] = layout.torch_to_ours(name, sd[key], config)
    return out


def hf_state_dict(model) -> dict[str, np.ndarray]:
    """Our parameters as a Hugging Face ``LlamaForCausalLM`` state dict (numpy, float32)."""
    from conversions.hf import OURS_TO_HF

    if not model.is_stacked:
        raise ValueError("stack the layers first")
    return to_torch_state_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)), model.config, OURS_TO_HF)


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
    from conversions.meta import OURS_TO_META

    c = model.config
    sd = to_torch_state_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)), c, OURS_TO_META)
    if c.tie_word_embeddings:
        sd[OURS_TO_META["lm_head"]] = sd[OURS_TO_META["embedder.embedding"]]
    for i in range(c.n_layers):
        for name, heads in (("layers.attention.q_proj", c.n_heads), ("layers.attention.k_proj", c.n_kv_heads)):
            key = OURS_TO_META[name].format(i=i)
            sd[key] = np.ascontiguousarray(layout.half_split_to_interleaved(sd[key], heads))
    return sd
