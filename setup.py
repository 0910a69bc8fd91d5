"""llama-jax: Meta's Llama 3.1 family in JAX / Flax NNX."""

from setuptools import find_packages, setup

setup(
    name="llama-jax",
    version="0.1.0",
    description="Llama 3.1 (8B/70B/405B) in JAX/Flax NNX: sharded model, checkpoint converters, jitted prefill/decode",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["llama_jax", "llama_jax.*", "conversions", "conversions.*"]),
    # the CPU kernels' C++ source, compiled on first use for the host CPU (llama_jax/cpu_kernels.py)
    package_data={"llama_jax": ["kernels/*.cc", "kernels/*.h"]},
    install_requires=[
        "jax>=0.7",
        "flax>=0.12",
        "optax",
        "orbax-checkpoint",
        "numpy",
        "ml_dtypes",
        "absl-py",
        "tqdm",
        "tiktoken",
        "sentencepiece",
        "tokenizers",
        "jinja2",
        "gguf",
        "safetensors",
        "tensorstore",
        "matplotlib",
    ],
    extras_require={
        # experiments/bench_generate.py's peer: llama.cpp (compiles from source, ~5 min on 2 cores)
        "bench": ["llama-cpp-python"],
        # reading Meta .pth checkpoints; the CPU build of this version is on local disk
        "convert": ["torch==2.13.0"],
        # references for parity tests: Hugging Face transformers and Meta's llama-models
        "test": [
            "torch==2.13.0",
            "transformers",
            "accelerate",
            "llama-models==0.3.0",
            "fairscale",
            "pytest",
            "pytest-xdist",
            "hypothesis",
            "nbclient",
            "ipykernel",
            "matplotlib",
            "fastapi",
            "uvicorn",
            "openai",
            "lm-eval[api]>=0.4,<0.5",
            # lint + format check in .ci/run; pinned so the formatter's output does not change under us
            "ruff==0.17.6",
        ],
        # the OpenAI-compatible server (python -m llama_jax.serve)
        "serve": ["fastapi", "uvicorn"],
        # the evaluation harness against the server (lm_eval --model local-completions)
        "eval": ["lm-eval[api]>=0.4,<0.5"],
    },
    entry_points={
        "console_scripts": [
            "llama-jax-convert=conversions.__main__:run",
            "llama-jax-generate=llama_jax.generate:run",
            "llama-jax-serve=llama_jax.serve:run",
        ]
    },
)
