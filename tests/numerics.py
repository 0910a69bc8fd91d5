"""Tolerances for float32 comparisons, derived from float32 rounding at a model's depth and width.

Two correct float32 implementations of one network (ours on XLA:CPU, transformers or Meta's reference in PyTorch, a
second process, another mesh, another XLA:CPU kernel: YNNPACK, oneDNN, Eigen, each with its own tiling and
accumulation order) round differently. A dot product of length K carries a rounding error of about
eps * sqrt(K) of its magnitude (eps = 2**-23; independent roundings add as a random walk), and the residual stream
of an L-layer decoder sums the errors of L such layers, again as a random walk. So, measured against the largest
|logit| (the scale absolute errors follow), two correct implementations agree within about

    rel = SAFETY * eps * sqrt(D * L)        D = model width, L = decoder layers

SAFETY = 4 covers the constant of the random walk (several dots per layer, the softmax and the norms). For
SmolLM2-135M (D 576, L 30) this is 6.3e-5 of max |logit|; correct implementations measured 5.8e-6 (transformers
vs ours, two CPUs), while perturbing one weight matrix of one layer by 1e-3 relative moves the logits by
1.2e-4 to 1.9e-3 of max |logit|, and RoPE theta off by 1% by 9.2e-4: the bound passes rounding and fails those
(tests/test_convert_gguf.py checks the perturbations on every run).
"""

from __future__ import annotations

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)
SAFETY = 4.0


def relative_tolerance(dim: int, n_layers: int) -> float:
    """Largest float32 rounding difference between two correct implementations, relative to max |output|."""
    return SAFETY * EPS32 * float(np.sqrt(dim * max(n_layers, 1)))


def logits_tolerance(ref, dim: int, n_layers: int) -> float:
    """Absolute tolerance for float32 logits (or hidden states) of a D-wide, L-layer model against ``ref``."""
    return relative_tolerance(dim, n_layers) * float(np.max(np.abs(np.asarray(ref, np.float64))))


def assert_logits_close(ours, ref, dim: int, n_layers: int, what: str = "logits") -> float:
    """Asserts max |ours - ref| <= :func:`logits_tolerance`; returns the max difference relative to max |ref|."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    assert np.all(np.isfinite(ours)), f"{what}: non-finite values"
    scale = float(np.max(np.abs(ref)))
    diff = float(np.max(np.abs(ours - ref)))
    tol = logits_tolerance(ref, dim, n_layers)
    print(
        f"{what}: max |diff| {diff:.3g} = {diff / scale:.3g} of max |ref| {scale:.3g} "
        f"(bound {relative_tolerance(dim, n_layers):.3g}, D={dim}, L={n_layers})"
    )
    assert diff <= tol, (
        f"{what}: max |ours - ref| = {diff:.3g} > {tol:.3g} "
        f"(= {relative_tolerance(dim, n_layers):.3g} x max |ref| {scale:.3g})"
    )
    return diff / scale


def exceeds_tolerance(ours, ref, dim: int, n_layers: int) -> bool:
    """True when ``ours`` is farther from ``ref`` than float32 rounding allows (a perturbed model must be)."""
    return float(np.max(np.abs(np.asarray(ours, np.float64) - np.asarray(ref, np.float64)))) > logits_tolerance(
        ref, dim, n_layers
    )
