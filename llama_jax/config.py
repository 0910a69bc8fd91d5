"""Model configuration: one frozen dataclass, named presets, readers for Meta and Hugging Face configs.

The field names follow Meta's ``params.json`` (``llama_models/llama3/args.py``): ``dim``, ``n_layers``,
``n_heads``, ``n_kv_heads``, ... The feed-forward width is stored resolved (``hidden_dim``) rather than as
``ffn_dim_multiplier`` / ``multiple_of``; :func:`ffn_hidden_dim` reproduces Meta's rounding.

Every invalid value raises ``ValueError`` naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 RoPE frequency scaling ("llama3" rope type).

    Source: ``apply_scaling`` in ``llama_models/llama3/model.py``; Llama 3 paper (arXiv:2407.21783) section 3.4.
    Frequencies whose wavelength exceeds ``original_max_position / low_freq_factor`` are divided by ``factor``;
    those shorter than ``original_max_position / high_freq_factor`` are kept; the band between is interpolated.
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self):
        if not self.factor > 0:
            raise ValueError(f"rope_scaling.factor must be > 0, got {self.factor}")
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(
                "rope_scaling.low_freq_factor must be > 0 and < rope_scaling.high_freq_factor, got "
                f"{self.low_freq_factor} and {self.high_freq_factor}"
            )
        if not self.original_max_position > 0:
            raise ValueError(f"rope_scaling.original_max_position must be > 0, got {self.original_max_position}")


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """SwiGLU hidden width as Meta computes it (``FeedForward`` in ``llama_models/llama3/model.py``).

    ``hidden = int(2 * 4 * dim / 3)``; times ``ffn_dim_multiplier`` (then ``int``) when given; rounded up to a
    multiple of ``multiple_of``. 8B: 14336, 70B: 28672, 405B: 53248.
    """
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a Llama 3.x decoder (no dtypes: those are chosen when a model is built or loaded).

    Attributes:
      vocab_size: V, rows of the token embedding.
      dim: D, model (residual stream) width.
      n_layers: L, decoder blocks.
      n_heads: N, query heads.
      n_kv_heads: K, key/value heads (grouped-query attention; N must be a multiple of K).
      hidden_dim: F, SwiGLU hidden width.
      head_dim: H, per-head width; defaults to ``dim // n_heads``.
      norm_eps: RMSNorm epsilon.
      rope_theta: RoPE base.
      rope_scaling: Llama 3.1 frequency scaling, or None for plain RoPE.
      max_seq_len: context length the model supports (positions 0 .. max_seq_len - 1).
      tie_word_embeddings: the output head reuses the token embedding (Llama 3.2 1B/3B, SmolLM2).
    """

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden_dim: int
    head_dim: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 131072
    tie_word_embeddings: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(
                    f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads}) unless head_dim is given"
                )
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int) or self.head_dim <= 0:
            raise ValueError(f"head_dim must be a positive integer, got {self.head_dim!r}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError(f"rope_scaling must be a RopeScaling or None, got {self.rope_scaling!r}")

    # ------------------------------------------------------------------ derived sizes
    @property
    def n_groups(self) -> int:
        """G = N / K, query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    def num_params(self) -> int:
        """Parameter count by arithmetic (embedding counted once when tied)."""
        d, h = self.dim, self.head_dim
        attn = d * h * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * d * self.hidden_dim
        per_layer = attn + mlp + 2 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.n_layers * per_layer + d + head

    def replace(self, **changes) -> LlamaConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LlamaConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown LlamaConfig field(s): {', '.join(unknown)}")
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return cls(**d)

    # ------------------------------------------------------------------ Meta params.json
    @classmethod
    def from_meta_params(
        cls, params: str | os.PathLike | Mapping[str, Any], *, max_seq_len: int = 131072
    ) -> LlamaConfig:
        """Reads Meta's ``params.json`` (a path, or the parsed dict).

        Fields: dim, n_layers, n_heads, n_kv_heads, vocab_size, ffn_dim_multiplier, multiple_of, norm_eps,
        rope_theta, use_scaled_rope. Source: ``llama_models/llama3/args.py``. ``use_scaled_rope`` selects
        the Llama 3.1 scaling with Meta's fixed constants (factor 8, low 1, high 4, original context 8192).

        Raises:
          ValueError: a missing or invalid field, named.
        """
        p = _read_json(params)
        for required in ("dim", "n_layers", "n_heads", "vocab_size"):
            if required not in p:
                raise ValueError(f"params.json: missing field {required!r}")
        if p["vocab_size"] is None or p["vocab_size"] <= 0:
            raise ValueError(f"params.json: vocab_size must be positive, got {p['vocab_size']!r}")
        dim = p["dim"]
        hidden = ffn_hidden_dim(dim, p.get("multiple_of", 256), p.get("ffn_dim_multiplier"))
        return cls(
            vocab_size=p["vocab_size"],
            dim=dim,
            n_layers=p["n_layers"],
            n_heads=p["n_heads"],
            n_kv_heads=p.get("n_kv_heads") or p["n_heads"],
            hidden_dim=hidden,
            norm_eps=p.get("norm_eps", 1e-5),
            rope_theta=float(p.get("rope_theta", 500000.0)),
            rope_scaling=RopeScaling() if p.get("use_scaled_rope", False) else None,
            max_seq_len=max_seq_len,
            tie_word_embeddings=False,
        )

    def to_meta_params(self) -> dict[str, Any]:
        """The inverse of :meth:`from_meta_params` (``ffn_dim_multiplier`` chosen so the width round-trips).

        Raises:
          ValueError: a config Meta's format cannot express (tied embeddings, non-default head_dim, or RoPE
            scaling other than Meta's fixed constants).
        """
        if self.tie_word_embeddings:
            raise ValueError("tie_word_embeddings: Meta's params.json has no tied-embedding form")
        if self.head_dim != self.dim // self.n_heads:
            raise ValueError("head_dim: Meta's params.json cannot express head_dim != dim // n_heads")
        if self.rope_scaling not in (None, RopeScaling()):
            raise ValueError("rope_scaling: Meta's reference supports only factor 8, low 1, high 4, context 8192")
        base = int(2 * 4 * self.dim / 3)
        params = dict(
            dim=self.dim,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            vocab_size=self.vocab_size,
            multiple_of=1,
            ffn_dim_multiplier=None,
            norm_eps=self.norm_eps,
            rope_theta=self.rope_theta,
            use_scaled_rope=self.rope_scaling is not None,
        )
        if base != self.hidden_dim:
            # int(m * base) == hidden_dim for m slightly above hidden_dim / base
            params["ffn_dim_multiplier"] = (self.hidden_dim + 0.5) / base
        assert ffn_hidden_dim(self.dim, 1, params["ffn_dim_multiplier"]) == self.hidden_dim
        return params

    # ------------------------------------------------------------------ Hugging Face config.json
    @classmethod
    def from_hf_config(cls, config: str | os.PathLike | Mapping[str, Any]) -> LlamaConfig:
        """Reads a Hugging Face ``LlamaConfig`` (``config.json`` path, its directory, or the dict).

        Rope scaling is read from ``rope_scaling`` (``rope_type``, or the legacy key ``type``) and from
        transformers 5's ``rope_parameters``. Rope types ``default`` and ``llama3`` are supported.

        Raises:
          ValueError: naming the field, for unknown rope types and for fields that would change the math
            (``attention_bias``, ``mlp_bias``, ``hidden_act`` other than silu, ``partial_rotary_factor``,
            a non-llama ``model_type``).
        """
        c = _read_json(config, filename="config.json")
        model_type = c.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"config.json: model_type {model_type!r} is not supported (expected 'llama')")
        for flag in ("attention_bias", "mlp_bias"):
            if c.get(flag):
                raise ValueError(f"config.json: {flag}=true is not supported (Llama has no biases)")
        act = c.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config.json: hidden_act={act!r} is not supported (Llama uses silu)")
        for required in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            if required not in c:
                raise ValueError(f"config.json: missing field {required!r}")

        rope = dict(c.get("rope_parameters") or {})
        legacy = c.get("rope_scaling")
        if legacy:
            rope.update(legacy)
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("config.json: rope partial_rotary_factor != 1 is not supported")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        theta = float(rope.get("rope_theta", c.get("rope_theta", 10000.0)))
        if rope_type == "default":
            scaling = None
        elif rope_type == "llama3":
            try:
                scaling = RopeScaling(
                    factor=float(rope["factor"]),
                    low_freq_factor=float(rope["low_freq_factor"]),
                    high_freq_factor=float(rope["high_freq_factor"]),
                    original_max_position=int(rope["original_max_position_embeddings"]),
                )
            except KeyError as e:
                raise ValueError(f"config.json: rope_scaling is missing {e.args[0]!r} for rope_type 'llama3'") from None
        else:
            raise ValueError(
                f"config.json: rope_scaling rope_type {rope_type!r} is not supported (supported: 'default', 'llama3')"
            )
        return cls(
            vocab_size=c["vocab_size"],
            dim=c["hidden_size"],
            n_layers=c["num_hidden_layers"],
            n_heads=c["num_attention_heads"],
            n_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
            hidden_dim=c["intermediate_size"],
            head_dim=c.get("head_dim"),
            norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_seq_len=int(c.get("max_position_embeddings", 131072)),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        )

    def to_hf_config(self, **extra) -> dict[str, Any]:
        """A ``config.json`` dict that ``transformers.LlamaConfig`` / ``LlamaForCausalLM`` loads as it is.

        ``extra`` (e.g. ``bos_token_id``, ``eos_token_id``, ``torch_dtype``) is merged in.
        """
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            s = self.rope_scaling
            rope.update(
                rope_type="llama3",
                factor=s.factor,
                low_freq_factor=s.low_freq_factor,
                high_freq_factor=s.high_freq_factor,
                original_max_position_embeddings=s.original_max_position,
            )
        out = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "intermediate_size": self.hidden_dim,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope if self.rope_scaling is not None else None,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "pretraining_tp": 1,
            "use_cache": True,
        }
        out.update(extra)
        return out


def _read_json(source, filename: str | None = None) -> dict[str, Any]:
    if isinstance(source, Mapping):
        return dict(source)
    path = os.fspath(source)
    if filename and os.path.isdir(path):
        path = os.path.join(path, filename)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


_LLAMA31_SCALING = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192)
_LLAMA32_SCALING = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192)

PRESETS: dict[str, LlamaConfig] = {
    "llama3.1-8b": LlamaConfig(
        vocab_size=128256,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        hidden_dim=14336,
        rope_scaling=_LLAMA31_SCALING,
    ),
    "llama3.1-70b": LlamaConfig(
        vocab_size=128256,
        dim=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        hidden_dim=28672,
        rope_scaling=_LLAMA31_SCALING,
    ),
    "llama3.1-405b": LlamaConfig(
        vocab_size=128256,
        dim=16384,
        n_layers=126,
        n_heads=128,
        n_kv_heads=8,
        hidden_dim=53248,
        rope_scaling=_LLAMA31_SCALING,
    ),
    "llama3.2-1b": LlamaConfig(
        vocab_size=128256,
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        hidden_dim=8192,
        head_dim=64,
        rope_scaling=_LLAMA32_SCALING,
        tie_word_embeddings=True,
    ),
    "llama3.2-3b": LlamaConfig(
        vocab_size=128256,
        dim=3072,
        n_layers=28,
        n_heads=24,
        n_kv_heads=8,
        hidden_dim=8192,
        head_dim=128,
        rope_scaling=_LLAMA32_SCALING,
        tie_word_embeddings=True,
    ),
    "llama3-8b": LlamaConfig(
        vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336, max_seq_len=8192
    ),
    "llama3-70b": LlamaConfig(
        vocab_size=128256, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672, max_seq_len=8192
    ),
}


def get_preset(name: str) -> LlamaConfig:
    """Returns the named preset. Raises ValueError listing the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
