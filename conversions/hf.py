"""Hugging Face Llama checkpoints (config.json + model.safetensors or sharded model-*.safetensors with
model.safetensors.index.json) -> llama-jax.

Tensors are read lazily with ``safetensors.safe_open`` (memory-mapped; numpy for float32/float16, so no torch is
needed, torch only for bfloat16); each layer re-opens its files so the
mapping of the previous layer is released. Hugging Face already stores q/k rows in the half-split RoPE order,
so the layout transforms are only transposes/reshapes (:data:`conversions.layout.PARAM_LAYOUT`). With
``tie_word_embeddings`` there is no ``lm_head.weight`` (an extra one, if present, is ignored).

Key map (HF name -> llama-jax name):
"""

from __future__ import annotations

import json
import os

import numpy as np

from conversions import layout
from conversions.common import ConversionError, Source, check_shape, torch_to_numpy
from llama_jax.config import LlamaConfig

HF_KEYS = {
    "model.embed_tokens.weight": "embedder.embedding",
    "model.norm.weight": "final_norm.scale",
    "lm_head.weight": "lm_head",
    "model.layers.{i}.input_layernorm.weight": "layers.attention_norm.scale",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.attention.q_proj",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.attention.k_proj",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.attention.v_proj",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.attention.o_proj",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.ffn_norm.scale",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.mlp.gate_proj",
    "model.layers.{i}.mlp.up_proj.weight": "layers.mlp.up_proj",
    "model.layers.{i}.mlp.down_proj.weight": "layers.mlp.down_proj",
}
OURS_TO_HF = {v: k for k, v in HF_KEYS.items()}
__doc__ += "\n".join(f"    {k:50s} -> {v}" for k, v in HF_KEYS.items()) + "\n"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
)


# LlamaConfig field -> the config.json key it comes from, so errors name what the user can see in the file
HF_FIELDS = {
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "hidden_dim": "intermediate_size",
    "norm_eps": "rms_norm_eps",
    "max_seq_len": "max_position_embeddings",
}


def _hf_names(message: str) -> str:
    import re

    return re.sub(r"\b(" + "|".join(HF_FIELDS) + r")\b", lambda m: HF_FIELDS[m.group(1)], message)


def _open(path: str, framework: str = "numpy"):
    """``safe_open`` of ``path``: numpy (no torch needed) for headers and float32/float16 tensors; "pt" for
    bfloat16 tensors, which safetensors' numpy reader does not decode."""
    from safetensors import safe_open

    try:
        return safe_open(path, framework=framework)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing safetensors file") from None
    except Exception as e:  # SafetensorError: truncated header, bad JSON, ...
        raise ConversionError(f"{path}: cannot read safetensors file, truncated or corrupt ({e})") from None


class HFSource(Source):
    """A Hugging Face Llama folder. Raises FileNotFoundError / ConversionError naming the file and reason."""

    def __init__(self, directory: str):
        self.dir = directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"{directory}: checkpoint directory not found")
        cfg_file = os.path.join(directory, "config.json")
        try:
            self.config = LlamaConfig.from_hf_config(cfg_file)
        except ValueError as e:
            msg = _hf_names(str(e))
            raise ConversionError(msg if msg.startswith(cfg_file) else f"{cfg_file}: {msg}") from None
        index = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ConversionError(f"{index}: not a safetensors index ({e})") from None
            self.file_of = {k: os.path.join(directory, v) for k, v in weight_map.items()}
        elif os.path.isfile(single):
            self.file_of = None
            self._single = single
        else:
            raise FileNotFoundError(f"{single}: missing (no model.safetensors or model.safetensors.index.json)")
        self._check()
        self.tokenizer_files = [
            os.path.join(directory, f) for f in TOKENIZER_FILES if os.path.isfile(os.path.join(directory, f))
        ]

    def _files(self) -> list[str]:
        return sorted(set(self.file_of.values())) if self.file_of else [self._single]

    def _check(self):
        c = self.config
        shapes, dtypes, where, self.total_bytes = {}, set(), {}, 0
        for path in self._files():
            size = os.path.getsize(path) if os.path.exists(path) else None
            with _open(path) as f:
                for k in f.keys():
                    sl = f.get_slice(k)
                    shapes[k] = tuple(sl.get_shape())
                    dtypes.add(sl.get_dtype())
                    where[k] = path
            self.total_bytes += size or 0
        if self.file_of is None:
            self.file_of = where
        want = {}
        for key, name in HF_KEYS.items():
            if name == "lm_head" and c.tie_word_embeddings:
                continue
            for i in range(c.n_layers) if "{i}" in key else [None]:
                want[key.format(i=i) if i is not None else key] = name
        for key, name in want.items():
            if key not in shapes:
                raise ConversionError(f"{self.file_of.get(key, self._files()[0])}: tensor {key} is missing")
            check_shape(where[key], key, shapes[key], layout.torch_shape(name, c))
        self.want = want
        import ml_dtypes

        natural = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F16": np.float16}
        self.dtype = np.dtype(natural.get(dtypes.pop(), np.float32) if len(dtypes) == 1 else np.float32)

    def _read(self, keys):
        """{key: numpy array} for ``keys``, each file opened once (and released after)."""
        out = {}
        by_file = {}
        for k in keys:
            by_file.setdefault(self.file_of[k], []).append(k)
        for path, ks in by_file.items():
            bf16 = []
            with _open(path) as f:
                for k in ks:
                    if f.get_slice(k).get_dtype() == "BF16":
                        bf16.append(k)
                        continue
                    try:
                        out[k] = np.array(f.get_tensor(k))  # own copy, not a view of the mapping
                    except Exception as e:
                        raise ConversionError(f"{path}: cannot read tensor {k} ({e})") from None
                    self.bytes_read += out[k].nbytes
            if bf16:
                try:
                    import torch  # noqa: F401
                except ImportError:
                    raise ConversionError(
                        f'{path}: bfloat16 tensors need torch to read (pip install -e ".[convert]")'
                    ) from None
                with _open(path, "pt") as f:
                    for k in bf16:
                        try:
                            out[k] = torch_to_numpy(f.get_tensor(k))
                        except Exception as e:
                            raise ConversionError(f"{path}: cannot read tensor {k} ({e})") from None
                        self.bytes_read += out[k].nbytes
        return out

    def global_tensors(self):
        keys = [k for k, n in self.want.items() if not n.startswith("layers.")]
        for k, w in self._read(keys).items():
            yield self.want[k], w

    def layer_tensors(self, i):
        keys = [k.format(i=i) for k in HF_KEYS if "{i}" in k]
        for k, w in self._read(keys).items():
            yield self.want[k], w
