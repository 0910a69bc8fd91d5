"""Shared fixtures. The real SmolLM2-135M-Instruct checkpoint is converted once per machine and reused."""

import fcntl
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running; not needed for an issue's acceptance")


@pytest.fixture(scope="session")
def smollm2_checkpoint() -> str:
    """A llama-jax checkpoint of SmolLM2-135M-Instruct (float32), converted from the GGUF by the CLI's own path.

    Converted into ``$LLAMA_JAX_CACHE`` (default ~/.cache/llama_jax), under a file lock so that parallel test
    workers convert it once.
    """
    from llama_jax.generate import cache_root, default_checkpoint

    os.makedirs(cache_root(), exist_ok=True)
    with open(os.path.join(cache_root(), ".smollm2.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return default_checkpoint(quiet=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    from llama_jax import assets

    return assets.smollm2_gguf_path()


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf):
    """transformers' LlamaForCausalLM loading the same GGUF (dequantized, float32)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_gguf), gguf_file=os.path.basename(smollm2_gguf), dtype=torch.float32
    )
    return model.eval()


def run_cli(module: str, *args: str, env=None, timeout=900) -> subprocess.CompletedProcess:
    """Runs ``python -m module args`` from the repository root; returns the completed process (text mode)."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def keep_kernel_flags(env: dict) -> dict:
    """Drops a fake-device count from ``env["XLA_FLAGS"]`` but keeps the other XLA flags (the kernel choices a run
    may be shaken with, e.g. YNNPACK off or oneDNN dots), for subprocesses that pick their own device count."""
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    else:
        env.pop("XLA_FLAGS", None)
    return env
