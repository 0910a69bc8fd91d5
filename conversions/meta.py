"""Meta native checkpoints (params.json + consolidated.NN.pth, any model-parallel shard count) -> llama-jax.

Facts: ../shared/cases/conversion.md; writer: ``llama_models/llama3/model.py`` with fairscale model parallel.

Safety: every ``.pth`` is opened with ``torch.load(weights_only=True, mmap=True)``: PyTorch's restricted unpickler
accepts only tensors and plain containers, so a pickle that would run code is refused (ConversionError naming the
file) before anything is executed.

Memory: the shards are memory-mapped; for each decoder layer every shard is opened again, that layer's slices are
copied out and merged, and the mapping is dropped, so resident memory stays about one layer (plus the embeddings)
whatever the model size.

Merging (``META_KEYS`` below: Meta key -> llama-jax name, concatenation dim, RoPE head count):
ColumnParallel weights (wq, wk, wv, w1, w3, output) concatenate on dim 0, RowParallel (wo, w2) on dim 1, the
vocabulary-parallel embedding on dim 0 (Llama 3) or dim 1 (Llama 2 layout, detected from shapes); norms are
replicated: shard 0 is taken after checking all shards agree to 1e-2. The vocabulary size and KV-head count come
from tensor shapes; a params.json that disagrees is refused naming the field. When every shard holds one KV head
and adjacent heads are identical (405B MP16 stores each of its 8 KV heads twice) the duplicates are dropped after
checking every pair in every layer is bitwise identical. q/k rows go from Meta's interleaved RoPE order to the
half-split order (:func:`conversions.layout.interleaved_to_half_split`, q by n_heads, k by n_kv_heads).
"""

from __future__ import annotations

import glob
import json
import os
import re

import numpy as np

from conversions import layout
from conversions.common import ConversionError, Source, torch_to_numpy
from llama_jax.config import LlamaConfig, ffn_hidden_dim

# Meta key -> (llama-jax name, concat dim or None (replicated), RoPE head-count attribute or None)
META_KEYS = {
    "tok_embeddings.weight": ("embedder.embedding", 0, None),
    "norm.weight": ("final_norm.scale", None, None),
    "output.weight": ("lm_head", 0, None),
    "layers.{i}.attention_norm.weight": ("layers.attention_norm.scale", None, None),
    "layers.{i}.attention.wq.weight": ("layers.attention.q_proj", 0, "n_heads"),
    "layers.{i}.attention.wk.weight": ("layers.attention.k_proj", 0, "n_kv_heads"),
    "layers.{i}.attention.wv.weight": ("layers.attention.v_proj", 0, None),
    "layers.{i}.attention.wo.weight": ("layers.attention.o_proj", 1, None),
    "layers.{i}.ffn_norm.weight": ("layers.ffn_norm.scale", None, None),
    "layers.{i}.feed_forward.w1.weight": ("layers.mlp.gate_proj", 0, None),
    "layers.{i}.feed_forward.w3.weight": ("layers.mlp.up_proj", 0, None),
    "layers.{i}.feed_forward.w2.weight": ("layers.mlp.down_proj", 1, None),
}
OURS_TO_META = {v[0]: k for k, v in META_KEYS.items()}
NORM_TOLERANCE = 1e-2
_SHARD_RE = re.compile(r"consolidated\.(\d+)\.pth$")


def load_pth(path: str):
    """``torch.load(path, mmap=True, weights_only=True)``; ConversionError naming the file when it is not a plain
    tensor checkpoint (malicious or foreign pickle) or is truncated / corrupt."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if "global" in line.lower()] or [type(e).__name__]
        first = lines[0][:200]
        raise ConversionError(f"{path}: refused to unpickle: not a plain tensor checkpoint ({first})") from None
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except Exception as e:  # truncated zip, bad magic, ...
        raise ConversionError(
            f"{path}: cannot read PyTorch checkpoint, truncated or corrupt ({type(e).__name__}: {str(e).strip()[:200]})"
        ) from None


class MetaSource(Source):
    """A Meta checkpoint directory. Raises FileNotFoundError / ConversionError naming the file and reason."""

    def __init__(self, directory: str):
        self.dir = directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"{directory}: checkpoint directory not found")
        params_file = os.path.join(directory, "params.json")
        if not os.path.isfile(params_file):
            raise FileNotFoundError(f"{params_file}: missing")
        try:
            with open(params_file) as f:
                self.params = json.load(f)
        except json.JSONDecodeError as e:
            raise ConversionError(f"{params_file}: not valid JSON ({e})") from None
        self.params_file = params_file
        self.shards = self._shard_files()
        self._scan()
        self.tokenizer_files = [p for p in (os.path.join(directory, "tokenizer.model"),) if os.path.isfile(p)]

    # ------------------------------------------------------------------ discovery and validation
    def _shard_files(self) -> list[str]:
        found = {}
        for p in glob.glob(os.path.join(self.dir, "consolidated.*.pth")):
            m = _SHARD_RE.search(os.path.basename(p))
            if m:
                found[int(m.group(1))] = p
        if not found:
            raise FileNotFoundError(f"{os.path.join(self.dir, 'consolidated.00.pth')}: missing (no shard files)")
        n = max(found) + 1
        missing = [os.path.join(self.dir, f"consolidated.{i:02d}.pth") for i in range(n) if i not in found]
        if missing:
            raise FileNotFoundError(f"{missing[0]}: missing shard ({len(found)} of {n} shard files present)")
        return [found[i] for i in range(n)]

    def _scan(self):
        """Reads every shard's tensor names/shapes/dtypes (no tensor data), checks them, derives the config."""
        headers = []
        for p in self.shards:
            sd = load_pth(p)
            headers.append({k: (tuple(v.shape), v.dtype) for k, v in sd.items()})
            del sd
        keys0 = set(headers[0])
        for p, h in zip(self.shards[1:], headers[1:], strict=False):
            diff = sorted(keys0 ^ set(h))
            if diff:
                raise ConversionError(f"{p}: tensor names differ from {self.shards[0]} (e.g. {diff[0]})")
            for k in sorted(h):
                if h[k][0] != headers[0][k][0]:
                    raise ConversionError(
                        f"{p}: tensor {k} has shape {h[k][0]}, but {headers[0][k][0]} in "
                        f"{self.shards[0]} (shards with inconsistent shapes)"
                    )
        h0, n = headers[0], len(self.shards)
        p, pf = self.params, self.params_file
        for field in ("dim", "n_layers", "n_heads"):
            if field not in p:
                raise ConversionError(f"{pf}: missing field {field!r}")
        for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of"):
            v = p.get(field)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ConversionError(f"{pf}: field {field!r} must be a positive integer, got {v!r}")
        first = self.shards[0]

        def shape(key):
            if key not in h0:
                raise ConversionError(f"{first}: tensor {key} is missing")
            return h0[key][0]

        dim = shape("norm.weight")[0]
        if dim != p["dim"]:
            raise ConversionError(f"{pf}: field 'dim'={p['dim']} disagrees with the weights (norm.weight: {dim})")
        n_layers = len({k.split(".")[1] for k in h0 if k.startswith("layers.")})
        if n_layers != p["n_layers"]:
            raise ConversionError(
                f"{pf}: field 'n_layers'={p['n_layers']} disagrees with the weights ({n_layers} layers in {first})"
            )
        n_heads = p["n_heads"]
        head_dim = dim // n_heads
        wo = shape("layers.0.attention.wo.weight")
        expect_n = (n_heads * head_dim) // wo[1] if wo[1] else 0
        if wo[1] * n != n_heads * head_dim:
            if expect_n > n and wo[1] * expect_n == n_heads * head_dim:
                raise FileNotFoundError(
                    f"{os.path.join(self.dir, f'consolidated.{n:02d}.pth')}: missing shard (the tensor shapes "
                    f"say {expect_n} model-parallel shards, found {n})"
                )
            raise ConversionError(
                f"{pf}: field 'n_heads'={n_heads} disagrees with the weights "
                f"(layers.0.attention.wo.weight is {wo} per shard in {n} shards)"
            )
        emb = shape("tok_embeddings.weight")
        if emb[1] == dim:
            self.emb_dim, vocab = 0, emb[0] * n
        elif emb[1] * n == dim:
            self.emb_dim, vocab = 1, emb[0]  # Llama 2 layout: embedding split on the model dim
        else:
            raise ConversionError(
                f"{first}: tok_embeddings.weight has shape {emb}, which fits neither layout for dim {dim} in {n} shards"
            )
        kv_stored = shape("layers.0.attention.wk.weight")[0] * n // head_dim
        hidden = shape("layers.0.feed_forward.w1.weight")[0] * n
        if "vocab_size" in p and p["vocab_size"] != vocab:
            raise ConversionError(
                f"{pf}: field 'vocab_size'={p['vocab_size']} disagrees with the weights "
                f"(tok_embeddings.weight gives {vocab})"
            )
        claimed_kv = p.get("n_kv_heads") or n_heads
        if claimed_kv != kv_stored:
            raise ConversionError(
                f"{pf}: field 'n_kv_heads'={claimed_kv} disagrees with the weights "
                f"(layers.0.attention.wk.weight gives {kv_stored} KV heads)"
            )
        want_hidden = ffn_hidden_dim(dim, p.get("multiple_of", 256), p.get("ffn_dim_multiplier"))
        if want_hidden != hidden:
            raise ConversionError(
                f"{pf}: fields 'ffn_dim_multiplier'/'multiple_of' give hidden width {want_hidden}, the weights {hidden}"
            )
        self.n_shards = n
        self.dedupe_kv = False
        kv = kv_stored
        if n > 1 and kv_stored == n and kv_stored % 2 == 0:
            sds = [load_pth(s) for s in self.shards]
            wk = [sd["layers.0.attention.wk.weight"] for sd in sds]
            if all(bool((wk[2 * j] == wk[2 * j + 1]).all()) for j in range(n // 2)):
                self.dedupe_kv, kv = True, kv_stored // 2
            del sds, wk
        try:
            cfg = LlamaConfig.from_meta_params({**p, "vocab_size": vocab, "n_kv_heads": kv})
        except ValueError as e:
            raise ConversionError(f"{pf}: {e}") from None
        self.config = cfg
        self.kv_stored = kv_stored
        for key, (name, cat, _) in META_KEYS.items():
            if name == "lm_head" and "output.weight" not in h0:
                raise ConversionError(f"{first}: tensor output.weight is missing")
            keys = [key.format(i=i) for i in range(n_layers)] if "{i}" in key else [key]
            for k in keys:
                got = shape(k)
                want = list(layout.torch_shape(name, cfg))
                if name in ("layers.attention.k_proj", "layers.attention.v_proj"):
                    want[0] = kv_stored * head_dim
                if cat is not None:
                    c = self.emb_dim if name == "embedder.embedding" else cat
                    want[c] //= n
                if tuple(got) != tuple(want):
                    raise ConversionError(
                        f"{first}: tensor {k} has shape {tuple(got)}, expected {tuple(want)} "
                        f"for params.json and {n} shard(s)"
                    )
        dtypes = {d for h in headers for _, d in h.values()}
        self.dtype = np.dtype(torch_to_numpy(_empty(dtypes.pop())).dtype) if len(dtypes) == 1 else np.float32
        self.total_bytes = sum(os.path.getsize(s) for s in self.shards)

    # ------------------------------------------------------------------ reading
    def _merged(self, sds, key, name, cat):
        parts = [torch_to_numpy(sd[key]) for sd in sds]
        self.bytes_read += sum(x.nbytes for x in parts)
        if cat is None:
            for s, x in zip(self.shards[1:], parts[1:], strict=False):
                if not np.allclose(x.astype(np.float32), parts[0].astype(np.float32), atol=NORM_TOLERANCE, rtol=0):
                    raise ConversionError(
                        f"{s}: replicated tensor {key} differs from {self.shards[0]} by more than {NORM_TOLERANCE}"
                    )
            return parts[0]
        if name == "embedder.embedding":
            cat = self.emb_dim
        w = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=cat)
        del parts
        if self.dedupe_kv and name in ("layers.attention.k_proj", "layers.attention.v_proj"):
            h = self.config.head_dim
            heads = w.reshape(self.kv_stored, h, -1)
            if not np.array_equal(heads[0::2], heads[1::2]):
                raise ConversionError(
                    f"{self.dir}: {key}: duplicated KV heads (MP{self.n_shards}) are not pairwise identical"
                )
            w = np.ascontiguousarray(heads[0::2]).reshape(-1, w.shape[1])
        return w

    def _rope(self, name, w, rope_attr):
        if rope_attr is None:
            return w
        return layout.interleaved_to_half_split(w, getattr(self.config, rope_attr))

    def global_tensors(self):
        sds = [load_pth(s) for s in self.shards]
        for key, (name, cat, _rope) in META_KEYS.items():
            if "{i}" not in key:
                yield name, self._merged(sds, key, name, cat)
        del sds

    def layer_tensors(self, i):
        sds = [load_pth(s) for s in self.shards]  # re-opened per layer: the previous mapping is released
        for key, (name, cat, rope) in META_KEYS.items():
            if "{i}" in key:
                k = key.format(i=i)
                yield name, self._rope(name, self._merged(sds, k, name, cat), rope)
        del sds


def _empty(torch_dtype):
    import torch

    return torch.empty(0, dtype=torch_dtype)
