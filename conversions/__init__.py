"""The checkpoint conversion tool: Meta native, Hugging Face and GGUF checkpoints to llama-jax Orbax, and back.

Run ``python -m conversions --help``. ``conversions`` may import ``llama_jax``; ``llama_jax`` never imports it.
"""
