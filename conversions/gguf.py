"""GGUF (llama.cpp) Llama checkpoints -> llama-jax.

Parsing and dequantization use the ``gguf`` package (``GGUFReader`` memory-maps the file; ``gguf.quants.
dequantize``). Supported tensor types: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K; any other type is
refused naming the tensor. llama.cpp stores q/k rows in Meta's interleaved RoPE order (it permutes Hugging Face
weights back), so they are permuted with :func:`conversions.layout.interleaved_to_half_split`. After each layer
the file mapping's pages are released (``madvise(MADV_DONTNEED)``) so resident memory stays about one layer.

Key map (GGUF name -> llama-jax name); GGUF shapes are reversed (ne0 first), the dequantized arrays are
PyTorch [out, in]:
"""

from __future__ import annotations

import mmap
import os

import numpy as np

from conversions import layout
from conversions.common import ConversionError, Source, check_shape
from llama_jax.config import LlamaConfig, RopeScaling

GLOBAL_KEYS = {
    "token_embd.weight": "embedder.embedding",
    "output_norm.weight": "final_norm.scale",
    "output.weight": "lm_head",
}
LAYER_KEYS = {
    "blk.{i}.attn_norm.weight": "layers.attention_norm.scale",
    "blk.{i}.attn_q.weight": "layers.attention.q_proj",
    "blk.{i}.attn_k.weight": "layers.attention.k_proj",
    "blk.{i}.attn_v.weight": "layers.attention.v_proj",
    "blk.{i}.attn_output.weight": "layers.attention.o_proj",
    "blk.{i}.ffn_norm.weight": "layers.ffn_norm.scale",
    "blk.{i}.ffn_gate.weight": "layers.mlp.gate_proj",
    "blk.{i}.ffn_up.weight": "layers.mlp.up_proj",
    "blk.{i}.ffn_down.weight": "layers.mlp.down_proj",
}
__doc__ += "\n".join(f"    {k:28s} -> {v}" for k, v in {**GLOBAL_KEYS, **LAYER_KEYS}.items()) + "\n"

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
IGNORED = ("rope_freqs.weight",)


class GGUFSource(Source):
    """A GGUF file with ``general.architecture`` llama. Raises ConversionError / FileNotFoundError naming it."""

    def __init__(self, path: str):
        import gguf

        self.path = path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: GGUF file not found")
        try:
            self.reader = r = gguf.GGUFReader(path, "r")
        except Exception as e:  # the gguf package raises ValueError / struct errors on corrupt files
            raise ConversionError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
        self.tensors = {t.name: t for t in r.tensors}
        arch = self._field("general.architecture", None)
        if arch != "llama":
            raise ConversionError(f"{path}: general.architecture is {arch!r}, only 'llama' is supported")
        for t in r.tensors:
            if t.tensor_type.name not in SUPPORTED_TYPES:
                raise ConversionError(
                    f"{path}: tensor {t.name} has type {t.tensor_type.name}, not supported "
                    f"(supported: {', '.join(SUPPORTED_TYPES)})"
                )
        self.config = self._config()
        self._check_names_and_shapes()
        self.dtype = np.dtype(np.float32)  # dequantized values are float32
        self.total_bytes = sum(int(t.n_bytes) for t in r.tensors if t.name not in IGNORED)
        self.tokenizer_files = []

    def _field(self, key, default=...):
        f = self.reader.fields.get(key)
        if f is None:
            if default is ...:
                raise ConversionError(f"{self.path}: metadata field {key} is missing")
            return default
        return f.contents()

    def _positive(self, key, default=...) -> int:
        v = self._field(key, default)
        try:
            n = int(v)
        except (TypeError, ValueError):
            n = 0
        if n < 1 or n != v:
            raise ConversionError(f"{self.path}: metadata {key}={v!r} must be a positive integer")
        return n

    def _config(self) -> LlamaConfig:
        f = self._field
        emb = self.tensors.get("token_embd.weight")
        if emb is None:
            raise ConversionError(f"{self.path}: tensor token_embd.weight is missing")
        n_layers = self._positive("llama.block_count")
        dim, vocab = int(emb.shape[0]), int(emb.shape[1])
        n_heads = self._positive("llama.attention.head_count")
        if dim % n_heads:
            raise ConversionError(
                f"{self.path}: metadata llama.attention.head_count={n_heads} does not divide the embedding width {dim}"
            )
        k = self.tensors.get("blk.0.attn_k.weight")
        if k is None:
            raise ConversionError(f"{self.path}: tensor blk.0.attn_k.weight is missing")
        head_dim = self._positive("llama.rope.dimension_count", dim // n_heads)
        if int(k.shape[1]) % head_dim:
            raise ConversionError(
                f"{self.path}: metadata llama.rope.dimension_count={head_dim} does not divide "
                f"blk.0.attn_k.weight's {int(k.shape[1])} rows"
            )
        n_kv = int(k.shape[1]) // head_dim
        for key, got in (
            ("llama.embedding_length", dim),
            ("llama.vocab_size", vocab),
            ("llama.attention.head_count_kv", n_kv),
        ):
            claimed = f(key, None)
            if claimed is not None and int(claimed) != got:
                raise ConversionError(f"{self.path}: metadata {key}={claimed} disagrees with the tensor shapes ({got})")
        rope_type = f("llama.rope.scaling.type", "none")
        if rope_type not in ("none", "llama3"):
            raise ConversionError(f"{self.path}: llama.rope.scaling.type {rope_type!r} is not supported")
        ffn = self.tensors.get("blk.0.ffn_gate.weight")
        theta = float(f("llama.rope.freq_base", 10000.0))
        scaling = self._rope_scaling(head_dim, theta) if "rope_freqs.weight" in self.tensors else None
        return LlamaConfig(
            vocab_size=vocab,
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            hidden_dim=int(ffn.shape[1]) if ffn is not None else int(f("llama.feed_forward_length")),
            head_dim=head_dim,
            norm_eps=float(f("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_seq_len=int(f("llama.context_length", 131072)),
            tie_word_embeddings="output.weight" not in self.tensors,
        )

    def _rope_scaling(self, head_dim, theta):
        """llama.cpp stores Llama 3.1 scaling as rope_freqs.weight = per-pair wavelength factors; find the
        RopeScaling that reproduces them (factor from metadata, else 8 or 32), or refuse."""
        from llama_jax.rope import inverse_frequencies

        stored = np.asarray(self.tensors["rope_freqs.weight"].data, np.float32).reshape(-1)
        factor = self._field("llama.rope.scaling.factor", None)
        orig = int(self._field("llama.rope.scaling.original_context_length", 8192))
        base = inverse_frequencies(head_dim, theta, None)
        for fac in [float(factor)] if factor else [8.0, 32.0]:
            s = RopeScaling(factor=fac, original_max_position=orig)
            want = base / inverse_frequencies(head_dim, theta, s)
            if want.shape == stored.shape and np.allclose(want, stored, rtol=1e-3):
                return s
        raise ConversionError(
            f"{self.path}: rope_freqs.weight does not match Llama 3.1 RoPE scaling (factor 8 or 32, low 1, high 4)"
        )

    def _check_names_and_shapes(self):
        c = self.config
        want = {k: v for k, v in GLOBAL_KEYS.items() if not (v == "lm_head" and c.tie_word_embeddings)}
        for i in range(c.n_layers):
            want.update({k.format(i=i): v for k, v in LAYER_KEYS.items()})
        for key, name in want.items():
            t = self.tensors.get(key)
            if t is None:
                raise ConversionError(f"{self.path}: tensor {key} is missing")
            check_shape(self.path, key, tuple(int(s) for s in reversed(t.shape)), layout.torch_shape(name, c))
        extra = sorted(set(self.tensors) - set(want) - set(IGNORED))
        if extra:
            raise ConversionError(f"{self.path}: unexpected tensors {', '.join(extra[:5])}")

    def _read(self, key: str, name: str) -> np.ndarray:
        import gguf

        t = self.tensors[key]
        self.bytes_read += int(t.n_bytes)
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise ConversionError(f"{self.path}: cannot dequantize tensor {key} ({t.tensor_type.name}): {e}") from None
        w = np.asarray(w, dtype=np.float32).reshape(layout.torch_shape(name, self.config))
        c = self.config
        if name == "layers.attention.q_proj":
            w = layout.interleaved_to_half_split(w, c.n_heads)
        elif name == "layers.attention.k_proj":
            w = layout.interleaved_to_half_split(w, c.n_kv_heads)
        return np.array(w)  # own copy, not a view of the mapping

    def _release(self):
        mm = getattr(self.reader.data, "_mmap", None)
        if mm is not None and hasattr(mm, "madvise"):
            mm.madvise(mmap.MADV_DONTNEED)

    def global_tensors(self):
        for key, name in GLOBAL_KEYS.items():
            if key in self.tensors:
                yield name, self._read(key, name)
        self._release()

    def layer_tensors(self, i):
        for key, name in LAYER_KEYS.items():
            yield name, self._read(key.format(i=i), name)
        self._release()

    def prepare_tokenizer(self, workdir: str) -> list:
        """The embedded vocabulary as tokenizer files (``llama_jax.tokenizer.Tokenizer.save``); none when the
        GGUF has no ``tokenizer.ggml.model`` (weights-only file)."""
        from llama_jax.tokenizer import Tokenizer

        if "tokenizer.ggml.model" not in self.reader.fields:
            from absl import logging

            logging.warning("%s: no embedded tokenizer (tokenizer.ggml.model missing); none stored", self.path)
            return []
        out = os.path.join(workdir, "tokenizer")
        Tokenizer.from_file(self.path).save(out)
        return [out]
