"""llama-jax: Meta's Llama 3.x in JAX / Flax NNX.

Public facade: :class:`LlamaConfig`, :class:`Llama`, :func:`load`, :func:`save`, :class:`Tokenizer`,
:class:`ChatFormat`, :func:`generate`.
"""

from llama_jax.config import PRESETS, LlamaConfig, RopeScaling, get_preset
from llama_jax.model import Llama

__all__ = ["LlamaConfig", "RopeScaling", "PRESETS", "get_preset", "Llama"]
