"""llama-jax: Meta's Llama 3.x in JAX / Flax NNX.

Public facade: :class:`LlamaConfig`, :class:`Llama`, :func:`load`, :func:`save`, :class:`Tokenizer`,
:class:`ChatFormat`, :func:`generate`, :class:`Engine`.
"""

from llama_jax import data, quant, sharding, train
from llama_jax.chat import ChatFormat, TemplateChatFormat, chat_format_for
from llama_jax.checkpoint import load, save
from llama_jax.config import PRESETS, LlamaConfig, RopeScaling, get_preset
from llama_jax.engine import Completion, Engine
from llama_jax.model import Llama
from llama_jax.tokenizer import Tokenizer


def generate(model, tokenizer, prompts, **kwargs):
    """Generates continuations of text prompts: ``Engine(model).generate`` with the tokenizer's stop ids.

    Args:
      model: a :class:`Llama` (e.g. from :func:`load`).
      tokenizer: a :class:`Tokenizer`.
      prompts: strings (encoded with BOS) or token-id lists.
      **kwargs: see :meth:`Engine.generate` (max_new_tokens, temperature, top_k, top_p, min_p, seed, ...).

    Returns:
      list of :class:`Completion` (tokens, logprobs, finish_reason, text).
    """
    ids = [tokenizer.encode(p, bos=tokenizer.bos_id is not None) if isinstance(p, str) else list(p) for p in prompts]
    return Engine(model).generate(ids, tokenizer=tokenizer, **kwargs)


__all__ = [
    "LlamaConfig",
    "RopeScaling",
    "PRESETS",
    "get_preset",
    "Llama",
    "load",
    "save",
    "Tokenizer",
    "ChatFormat",
    "TemplateChatFormat",
    "chat_format_for",
    "Engine",
    "Completion",
    "generate",
    "data",
    "quant",
    "sharding",
    "train",
]
