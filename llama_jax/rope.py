"""Rotary position embeddings (RoPE) with Llama 3.1 frequency scaling.

Source: ``precompute_freqs_cis`` / ``apply_scaling`` / ``apply_rotary_emb`` in ``llama_models/llama3/model.py``,
and RoFormer (arXiv:2104.09864). One function, :func:`apply_rope`, rotates queries and keys on every path
(training, prefill, decode), so prefill and decode can never disagree.

Layout. Meta rotates adjacent pairs (2i, 2i+1) of each head. Inside llama-jax the q/k projection rows are stored
in the "half-split" order used by Hugging Face: pair i is (i, i + head_dim/2). The converters permute Meta and
GGUF weights into this order (``conversions/layout.py``); the rotation itself is then two multiplies and an add
on contiguous halves.

Precision. Inverse frequencies are computed once on the host exactly as the reference does in float32; angles
are ``float32(position) * inv_freq`` from int32 positions, cos/sin in float32, and only the rotated result is
cast back to the activation dtype (bf16 would round position 257 to 256).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.config import LlamaConfig, RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """Per-pair inverse frequencies, float32 numpy array of shape [head_dim // 2].

    ``1 / theta ** (2i / head_dim)`` computed as the reference does in float32, then Llama 3.1 scaling
    (when ``scaling`` is given): wavelengths above ``original_max_position / low_freq_factor`` are divided by
    ``factor``, those below ``original_max_position / high_freq_factor`` kept, the band between interpolated
    with ``smooth = (original_max_position / wavelength - low) / (high - low)``.
    """
    exponent = np.arange(0, head_dim, 2, dtype=np.float32)[: head_dim // 2] / np.float32(head_dim)
    # float32(theta ** e): the correctly rounded float32 power, which is what torch's float32 pow returns.
    power = (np.float64(theta) ** exponent.astype(np.float64)).astype(np.float32)
    freqs = (np.float32(1.0) / power).astype(np.float32)
    if scaling is None:
        return freqs
    factor = np.float32(scaling.factor)
    low, high = np.float32(scaling.low_freq_factor), np.float32(scaling.high_freq_factor)
    old_len = np.float32(scaling.original_max_position)
    wavelen = (np.float32(2 * np.pi) / freqs).astype(np.float32)
    low_freq_wavelen = old_len / low
    high_freq_wavelen = old_len / high
    divided = np.where(wavelen > low_freq_wavelen, freqs / factor, freqs).astype(np.float32)
    smooth = ((old_len / wavelen - low) / (high - low)).astype(np.float32)
    interpolated = ((np.float32(1) - smooth) * divided / factor + smooth * divided).astype(np.float32)
    band = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(band, interpolated, divided).astype(np.float32)


@functools.lru_cache(maxsize=64)
def _cached_inverse_frequencies(head_dim, theta, scaling):
    out = inverse_frequencies(head_dim, theta, scaling)
    out.setflags(write=False)
    return out


def config_inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    """:func:`inverse_frequencies` for a config (cached, read-only)."""
    return _cached_inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos and sin of the rotation angles, float32 [*positions.shape, head_dim // 2].

    Args:
      positions: int32 positions, any shape (typically [B, T]).
      inv_freq: float32 [head_dim // 2] from :func:`inverse_frequencies`.
    """
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        raise TypeError(f"positions must be an integer array, got {positions.dtype}")
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, positions: jax.Array, config: LlamaConfig) -> jax.Array:
    """Rotates queries or keys by their positions: the one RoPE function of every path.

    Args:
      x: [B, T, heads, H] in the half-split layout (pair i = (i, i + H/2)), any float dtype.
      positions: int32 [B, T].
      config: gives head_dim, rope_theta and rope_scaling.

    Returns:
      [B, T, heads, H] in ``x.dtype``; the rotation is computed in float32.
    """
    cos, sin = rope_cos_sin(positions, config_inverse_frequencies(config))  # [B, T, H/2]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
