"""Tokenizers: Meta's Llama 3 tiktoken BPE, SentencePiece (Llama 2), Hugging Face ``tokenizer.json``, GGUF vocab.

One class, :class:`Tokenizer`, wraps four back ends behind the same API::

    tok = Tokenizer.from_file(path)        # a file or a checkpoint's tokenizer directory
    ids = tok.encode("Hello", bos=True)     # list[int]
    text = tok.decode(ids)                  # str
    tok.save(directory)                     # Tokenizer.from_file(directory) gives the same tokenizer

Format detection (:meth:`Tokenizer.from_file`):

* ``tokenizer.model`` holding base64/rank lines: tiktoken BPE, Llama 3 (``kind == "llama3"``). The 256 special
  tokens get the reference's names and ids (128000 ``<|begin_of_text|>`` ... 128255), the split pattern is the
  reference's, and long inputs are split as the reference does (400,000-character windows, runs of whitespace or
  of non-whitespace broken at 25,000 characters). Reference: ``llama_models/llama3/tokenizer.py`` (llama-models
  0.3.0).
* a SentencePiece model protobuf (Llama 2's ``tokenizer.model``), through ``sentencepiece``
  (``kind == "sentencepiece"``).
* a Hugging Face ``tokenizer.json`` through ``tokenizers`` (``kind == "hf"``); the chat template, BOS/EOS names
  come from a ``tokenizer_config.json`` next to it and extra stop ids from ``generation_config.json``.
* a ``.gguf`` file: the vocabulary in the GGUF metadata (read with ``gguf``). A ``gpt2`` (byte-level BPE)
  vocabulary is rebuilt as a ``tokenizers.Tokenizer`` from the tokens and merges, with control tokens as special
  added tokens, so that encoding equals ``transformers.AutoTokenizer.from_pretrained(dir, gguf_file=name)``
  (``kind == "hf"``).
* a directory holding one of these (what :meth:`Tokenizer.save` writes, plus ``tokenizer_extras.json``).

Security: special-token text inside the input (``"<|eot_id|>"``) is encoded as plain text unless the caller
allows it with ``allowed_special``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from typing import Literal

__all__ = ["Tokenizer", "LLAMA3_SPECIAL_TOKENS", "LLAMA3_PAT_STR", "EXTRAS_FILE"]

# Reference: llama_models/llama3/tokenizer.py (llama-models 0.3.0).
LLAMA3_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_NAMED = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message (a tool call awaits its result)
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
    "<|image|>",
]
NUM_LLAMA3_SPECIAL = 256
LLAMA3_SPECIAL_TOKENS: list[str] = _LLAMA3_NAMED + [
    f"<|reserved_special_token_{2 + i}|>" for i in range(NUM_LLAMA3_SPECIAL - len(_LLAMA3_NAMED))
]
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000

EXTRAS_FILE = "tokenizer_extras.json"
_EXTRAS_VERSION = 1

# Special tokens that end a turn in common chat formats; any present in a vocabulary join its stop ids.
_EOT_LIKE = (
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<end_of_turn>",
    "<|end|>",
    "<|eot|>",
    "<|return|>",
)

AllowedSpecial = Literal["all"] | AbstractSet[str] | Sequence[str]


# ----------------------------------------------------------------------------------------------------------------
# Back ends: each encodes plain text (special-token text is plain), decodes ids, and saves its files.
# ----------------------------------------------------------------------------------------------------------------


def _split_runs(s: str, max_run: int) -> Iterator[str]:
    """Cut ``s`` so that no piece holds more than ``max_run`` consecutive whitespace or non-whitespace characters.

    Same cut points as ``Tokenizer._split_whitespaces_or_nonwhitespaces`` in llama_models/llama3/tokenizer.py
    (a cut every ``max_run`` characters inside a maximal same-class run), found with a regex instead of a Python
    loop over characters. ``re``'s ``\\s`` and ``str.isspace`` agree on every code point.
    """
    start = 0
    for m in re.finditer(r"\s+|\S+", s):
        a, b = m.span()
        cut = a + max_run
        while cut < b:
            yield s[start:cut]
            start = cut
            cut += max_run
    yield s[start:]


class _TiktokenBackend:
    kind = "llama3"

    def __init__(self, ranks: dict[bytes, int], name: str):
        import tiktoken

        n = len(ranks)
        if sorted(ranks.values()) != list(range(n)):
            raise ValueError(f"{name}: tiktoken ranks are not the contiguous range 0..{n - 1}")
        self.ranks = ranks
        self.special_tokens = {t: n + i for i, t in enumerate(LLAMA3_SPECIAL_TOKENS)}
        self.vocab_size = n + len(LLAMA3_SPECIAL_TOKENS)
        self.enc = tiktoken.Encoding(
            name=os.path.basename(name),
            pat_str=LLAMA3_PAT_STR,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )

    @classmethod
    def load(cls, path: str) -> _TiktokenBackend:
        ranks: dict[bytes, int] = {}
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    tok, rank = line.split()
                    ranks[base64.b64decode(tok, validate=True)] = int(rank)
                except Exception as e:  # noqa: BLE001 - re-raised with the culprit named
                    raise ValueError(f"{path}: line {lineno} is not '<base64 token> <rank>': {line[:80]!r}") from e
        return cls(ranks, path)

    def encode_plain(self, text: str) -> list[int]:
        out: list[int] = []
        for i in range(0, len(text), TIKTOKEN_MAX_ENCODE_CHARS):
            for piece in _split_runs(text[i : i + TIKTOKEN_MAX_ENCODE_CHARS], MAX_NO_WHITESPACES_CHARS):
                out.extend(self.enc.encode_ordinary(piece))
        return out

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self.enc.decode_bytes(ids)

    def save(self, directory: str) -> list[str]:
        path = os.path.join(directory, "tokenizer.model")
        with open(path, "wb") as f:
            for tok, rank in sorted(self.ranks.items(), key=lambda kv: kv[1]):
                f.write(base64.b64encode(tok) + b" " + str(rank).encode() + b"\n")
        return [path]


class _SentencePieceBackend:
    kind = "sentencepiece"

    def __init__(self, proto: bytes, name: str):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(proto)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{name}: not a SentencePiece model ({e})") from e
        self.proto = proto
        self.vocab_size = self.sp.get_piece_size()
        self.special_tokens = {
            self.sp.id_to_piece(i): i for i in range(self.vocab_size) if self.sp.is_control(i) or self.sp.is_unknown(i)
        }

    def encode_plain(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def save(self, directory: str) -> list[str]:
        path = os.path.join(directory, "tokenizer.model")
        with open(path, "wb") as f:
            f.write(self.proto)
        return [path]


class _HFBackend:
    kind = "hf"

    def __init__(self, tk):  # tk: tokenizers.Tokenizer
        self.tk = tk
        self.tk.encode_special_tokens = True  # special-token text is plain text; we split allowed ones ourselves
        self.vocab_size = tk.get_vocab_size(with_added_tokens=True)
        self.special_tokens = {t.content: i for i, t in tk.get_added_tokens_decoder().items() if t.special}

    def encode_plain(self, text: str) -> list[int]:
        return list(self.tk.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return self.tk.decode(ids, skip_special_tokens=False)

    def save(self, directory: str) -> list[str]:
        path = os.path.join(directory, "tokenizer.json")
        self.tk.encode_special_tokens = False  # store the library default
        try:
            self.tk.save(path)
        finally:
            self.tk.encode_special_tokens = True
        return [path]


# ----------------------------------------------------------------------------------------------------------------
# GGUF vocabulary -> tokenizers.Tokenizer
# ----------------------------------------------------------------------------------------------------------------

_GGUF_LLAMA3_PRE = {"llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"}


def _read_gguf_tokenizer(path: str, reader=None) -> tuple[object, dict]:
    """Build a ``tokenizers.Tokenizer`` (gpt2-style byte-level BPE) from GGUF metadata; returns (tk, extras).

    Keys read (llama.cpp names): ``tokenizer.ggml.{model,pre,tokens,token_type,merges,bos_token_id,eos_token_id,
    eot_token_id,eom_token_id,add_bos_token}`` and ``tokenizer.chat_template``. ``reader``: an open
    ``gguf.GGUFReader`` of ``path`` (opened here when None).
    Raises ValueError naming the file and the unsupported ``tokenizer.ggml.model``.
    """
    import gguf
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as TK

    if reader is None:
        reader = gguf.GGUFReader(path)
    fields = reader.fields

    def get(key, default=None):
        f = fields.get(key)
        return f.contents() if f is not None else default

    model = get("tokenizer.ggml.model")
    if model is None:
        raise ValueError(f"{path}: GGUF file has no tokenizer (no 'tokenizer.ggml.model' in its metadata)")
    if model != "gpt2":
        raise ValueError(
            f"{path}: GGUF tokenizer.ggml.model={model!r} is not supported (only 'gpt2' byte-level BPE); "
            "convert its tokenizer.json or tokenizer.model instead"
        )
    tokens: list[str] = get("tokenizer.ggml.tokens")
    merges: list[str] = get("tokenizer.ggml.merges") or []
    types: list[int] = get("tokenizer.ggml.token_type") or [1] * len(tokens)
    pre = get("tokenizer.ggml.pre", "default")

    # Byte-level spelling: tokens outside the byte alphabet (rare mislabels) are respelled byte by byte with
    # the ByteLevel pre-tokenizer itself; control tokens outside it are not added (as transformers does).
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    speller = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    vocab = {}
    for i, t in enumerate(tokens):
        key = t if set(t) <= alphabet else "".join(p for p, _ in speller.pre_tokenize_str(t))
        vocab.setdefault(key, i)
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tk = TK(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    if pre in _GGUF_LLAMA3_PRE:
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_PAT_STR), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:  # GPT-2's own split regex (what transformers uses for 'smollm' and other unlisted pre types)
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    control = [
        AddedToken(t, normalized=False, special=True)
        for t, ty in zip(tokens, types, strict=False)
        if ty == 3 and set(t) <= alphabet
    ]  # 3: CONTROL
    if control:
        tk.add_special_tokens(control)
    user = [
        AddedToken(t, normalized=False, special=False)
        for t, ty in zip(tokens, types, strict=False)
        if ty == 4 and t in vocab
    ]  # 4: USER_DEFINED
    if user:
        tk.add_tokens(user)

    def tid(key):
        v = get(key)
        return int(v) if v is not None else None

    bos, eos = tid("tokenizer.ggml.bos_token_id"), tid("tokenizer.ggml.eos_token_id")
    stops = {i for i in (eos, tid("tokenizer.ggml.eot_token_id"), tid("tokenizer.ggml.eom_token_id")) if i is not None}
    extras = {
        "bos_id": bos,
        "eos_id": eos,
        "stop_ids": sorted(stops),
        "chat_template": get("tokenizer.chat_template"),
        "add_bos_token": bool(get("tokenizer.ggml.add_bos_token", False)),
        "source": os.path.basename(path),
    }
    return tk, extras


# ----------------------------------------------------------------------------------------------------------------
# Format detection
# ----------------------------------------------------------------------------------------------------------------


def _describe(head: bytes) -> str:
    if not head:
        return "an empty file"
    if head.startswith(b"GGUF"):
        return "a GGUF file"
    s = head.lstrip()
    if s.startswith(b"{"):
        return "JSON"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"binary data (first bytes {head[:16].hex(' ')})"
    first = text.splitlines()[0] if text.splitlines() else ""
    return f"a text file (first line {first[:60]!r})"


_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/=]+ \d+$")


def _sniff_file(path: str) -> str:
    """'gguf' | 'json' | 'tiktoken' | 'sentencepiece'; ValueError naming what was found otherwise."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"GGUF"):
        return "gguf"
    if head.lstrip().startswith(b"{"):
        return "json"
    lines = [ln for ln in head.split(b"\n")[:-1] if ln.strip()] or [head.strip()]
    if head and all(_TIKTOKEN_LINE.match(ln.strip()) for ln in lines[:20]):
        return "tiktoken"
    if head[:1] == b"\x0a":  # protobuf field 1 (ModelProto.pieces), length-delimited: SentencePiece
        return "sentencepiece"
    raise ValueError(
        f"{path}: unknown tokenizer format: detected {_describe(head)}; expected a tiktoken BPE file (Llama 3 "
        "tokenizer.model), a SentencePiece model, a Hugging Face tokenizer.json, a .gguf file, or a directory "
        "holding one of these"
    )


def _as_id(tokens: dict[str, int], value) -> int | None:
    """A token given as an id, a string, or a HF AddedToken dict -> id (None when absent)."""
    if value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        value = value.get("content")
    return tokens.get(value)


# ----------------------------------------------------------------------------------------------------------------
# The public class
# ----------------------------------------------------------------------------------------------------------------


class Tokenizer:
    """Text <-> token ids for Llama-family checkpoints. Build it with :meth:`from_file`.

    Attributes:
      kind: ``"llama3"`` (tiktoken BPE), ``"sentencepiece"`` or ``"hf"`` (``tokenizers``, also for GGUF vocabs).
      bos_id, eos_id: int or None.
      stop_ids: frozenset of ids that end generation (Llama 3: {128001, 128008, 128009}; others: EOS plus the
        end-of-turn ids in the metadata or vocabulary).
      vocab_size: number of ids, special tokens included (Llama 3: 128,256).
      special_tokens: dict special-token text -> id.
      chat_template: Jinja chat template (GGUF ``tokenizer.chat_template`` / ``tokenizer_config.json``) or None.
      add_bos_token: whether the source asks for BOS on plain prompts (informational; ``encode`` takes ``bos``).
    """

    def __init__(
        self, backend, *, bos_id=None, eos_id=None, stop_ids=(), chat_template=None, add_bos_token=True, source=""
    ):
        self._backend = backend
        self.kind: str = backend.kind
        self.special_tokens: dict[str, int] = dict(backend.special_tokens)
        self.vocab_size: int = int(backend.vocab_size)
        self.bos_id: int | None = bos_id
        self.eos_id: int | None = eos_id
        self.stop_ids: frozenset[int] = frozenset(int(i) for i in stop_ids)
        self.chat_template: str | None = chat_template
        self.add_bos_token: bool = bool(add_bos_token)
        self.source = source
        self._id_to_special = {i: t for t, i in self.special_tokens.items()}
        self._special_re_cache: dict[frozenset, re.Pattern] = {}
        for name, v in (("bos_id", bos_id), ("eos_id", eos_id), *(("stop_ids", i) for i in self.stop_ids)):
            if v is not None and not 0 <= v < self.vocab_size:
                raise ValueError(f"{source}: {name}={v} is outside the vocabulary (size {self.vocab_size})")

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a tokenizer file or directory, detecting its format (see the module docstring).

        Raises:
          FileNotFoundError: ``path`` does not exist.
          ValueError: unknown format (the message names what was detected) or an inconsistent file.
        """
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"tokenizer path not found: {path}")
        if os.path.isdir(path):
            return cls._from_dir(path)
        kind = _sniff_file(path)
        if kind == "gguf":
            tk, extras = _read_gguf_tokenizer(path)
            return cls._make(_HFBackend(tk), extras, path)
        if kind == "json":
            return cls._from_hf_json(path, None)
        if kind == "tiktoken":
            return cls._make(_TiktokenBackend.load(path), {}, path)
        with open(path, "rb") as f:
            data = f.read()
        try:
            backend = _SentencePieceBackend(data, path)
        except ValueError as e:
            raise ValueError(
                f"{path}: unknown tokenizer format: detected {_describe(data[:64])} that SentencePiece "
                f"rejects ({e.__cause__})"
            ) from e
        return cls._make(backend, {}, path)

    @classmethod
    def from_gguf_reader(cls, reader, path: str = "") -> Tokenizer:
        """The vocabulary of an already open ``gguf.GGUFReader`` (saves re-parsing the file's metadata, which takes
        seconds). Same result as ``from_file(path)``. Raises ValueError like :meth:`from_file`."""
        path = os.fspath(path or getattr(getattr(reader, "data", None), "filename", None) or "<gguf>")
        tk, extras = _read_gguf_tokenizer(path, reader)
        return cls._make(_HFBackend(tk), extras, path)

    @classmethod
    def _from_dir(cls, d: str) -> Tokenizer:
        extras_path = os.path.join(d, EXTRAS_FILE)
        extras = None
        if os.path.exists(extras_path):
            try:
                with open(extras_path, encoding="utf-8") as f:
                    extras = json.load(f)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{extras_path}: not valid JSON ({e})") from None
            if not isinstance(extras, dict):
                raise ValueError(f"{extras_path}: expected a JSON object, got {type(extras).__name__}")
        tj, tm = os.path.join(d, "tokenizer.json"), os.path.join(d, "tokenizer.model")
        want = extras.get("kind") if extras else None
        if want == "hf" or (want is None and os.path.exists(tj)):
            if not os.path.exists(tj):
                raise ValueError(f"{extras_path}: kind 'hf' but {tj} is missing")
            return cls._from_hf_json(tj, extras)
        if os.path.exists(tm):
            kind = _sniff_file(tm)
            if kind == "tiktoken":
                backend = _TiktokenBackend.load(tm)
            elif kind == "sentencepiece":
                with open(tm, "rb") as f:
                    backend = _SentencePieceBackend(f.read(), tm)
            else:
                raise ValueError(f"{tm}: detected {kind}, expected a tiktoken BPE file or a SentencePiece model")
            if want is not None and want != backend.kind:
                raise ValueError(f"{extras_path}: kind {want!r} but {tm} is a {backend.kind} tokenizer")
            return cls._make(backend, extras or {}, tm)
        ggufs = sorted(f for f in os.listdir(d) if f.endswith(".gguf"))
        if len(ggufs) == 1:
            return cls.from_file(os.path.join(d, ggufs[0]))
        found = sorted(os.listdir(d))[:20]
        raise ValueError(
            f"{d}: unknown tokenizer directory: detected files {found}; expected tokenizer.model, tokenizer.json "
            "or exactly one .gguf file"
        )

    @classmethod
    def _from_hf_json(cls, path: str, extras: dict | None) -> Tokenizer:
        from tokenizers import Tokenizer as TK

        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: detected JSON that does not parse ({e})") from e
        if not isinstance(obj, dict) or "model" not in obj:
            keys = sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(
                f"{path}: unknown tokenizer format: detected JSON without a 'model' section "
                f"(top level: {keys}); expected a Hugging Face tokenizer.json"
            )
        try:
            tk = TK.from_str(text)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{path}: Hugging Face tokenizer.json rejected by `tokenizers`: {e}") from e
        backend = _HFBackend(tk)
        if extras is None:
            extras = cls._hf_side_files(os.path.dirname(path), backend)
        return cls._make(backend, extras, path)

    @staticmethod
    def _hf_side_files(d: str, backend: _HFBackend) -> dict:
        """bos/eos/chat template from tokenizer_config.json, eos list from generation_config.json (if present)."""
        vocab = backend.tk.get_vocab(with_added_tokens=True)
        cfg, gen = {}, {}
        for name, target in (("tokenizer_config.json", cfg), ("generation_config.json", gen)):
            p = os.path.join(d, name)
            if os.path.exists(p):
                with open(p, encoding="utf-8") as f:
                    target.update(json.load(f))
        tmpl = cfg.get("chat_template")
        if isinstance(tmpl, list):  # named templates: take "default"
            tmpl = next((t.get("template") for t in tmpl if t.get("name") == "default"), None)
        if tmpl is None and os.path.exists(os.path.join(d, "chat_template.jinja")):
            with open(os.path.join(d, "chat_template.jinja"), encoding="utf-8") as f:
                tmpl = f.read()
        bos, eos = _as_id(vocab, cfg.get("bos_token")), _as_id(vocab, cfg.get("eos_token"))
        gen_eos = gen.get("eos_token_id")
        stops = set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        if bos is None and isinstance(gen.get("bos_token_id"), int):
            bos = gen["bos_token_id"]
        if eos is None and stops:
            eos = min(stops)
        if eos is not None:
            stops.add(eos)
        return {
            "bos_id": bos,
            "eos_id": eos,
            "stop_ids": sorted(stops),
            "chat_template": tmpl,
            "add_bos_token": bool(cfg.get("add_bos_token", bos is not None)),
        }

    @classmethod
    def _make(cls, backend, extras: dict, source: str) -> Tokenizer:
        st = backend.special_tokens
        if backend.kind == "llama3":
            defaults = {
                "bos_id": st["<|begin_of_text|>"],
                "eos_id": st["<|end_of_text|>"],
                "stop_ids": [st["<|end_of_text|>"], st["<|eom_id|>"], st["<|eot_id|>"]],
                "chat_template": None,
                "add_bos_token": True,
            }
        elif backend.kind == "sentencepiece":
            sp = backend.sp
            bos, eos = sp.bos_id(), sp.eos_id()
            defaults = {
                "bos_id": bos if bos >= 0 else None,
                "eos_id": eos if eos >= 0 else None,
                "stop_ids": [eos] if eos >= 0 else [],
                "chat_template": None,
                "add_bos_token": True,
            }
        else:
            defaults = {"bos_id": None, "eos_id": None, "stop_ids": [], "chat_template": None, "add_bos_token": False}
        merged = {**defaults, **{k: v for k, v in extras.items() if k in defaults}}
        if backend.kind == "hf" and extras.get("kind") is None:
            # GGUF / HF: EOS plus the end-of-turn tokens the vocabulary has.
            stops = set(merged["stop_ids"]) | {st[t] for t in _EOT_LIKE if t in st}
            if merged["eos_id"] is not None:
                stops.add(merged["eos_id"])
            merged["stop_ids"] = sorted(stops)
        return cls(backend, source=source, **merged)

    # ------------------------------------------------------------------------------------------------ saving
    def save(self, directory: str | os.PathLike) -> list[str]:
        """Write the tokenizer files and ``tokenizer_extras.json`` (kind, bos/eos/stop ids, chat template) into
        ``directory`` (created if needed) so that ``Tokenizer.from_file(directory)`` gives an identical tokenizer.

        Llama 3 and SentencePiece write ``tokenizer.model``; HF and GGUF vocabularies write ``tokenizer.json``.
        Files are written to temporary names and renamed, so a failure leaves no half-written file.
        Returns the paths written.
        """
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, ".tokenizer_tmp")
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
        try:
            written = self._backend.save(tmp)
            extras = {
                "format_version": _EXTRAS_VERSION,
                "kind": self.kind,
                "bos_id": self.bos_id,
                "eos_id": self.eos_id,
                "stop_ids": sorted(self.stop_ids),
                "chat_template": self.chat_template,
                "add_bos_token": self.add_bos_token,
                "source": os.path.basename(self.source) if self.source else "",
                "vocab_size": self.vocab_size,
            }
            ep = os.path.join(tmp, EXTRAS_FILE)
            with open(ep, "w", encoding="utf-8") as f:
                json.dump(extras, f, indent=2, ensure_ascii=False)
            written.append(ep)
            out = []
            for p in written:
                dst = os.path.join(directory, os.path.basename(p))
                os.replace(p, dst)
                out.append(dst)
            return out
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # ------------------------------------------------------------------------------------------------ encoding
    def _allowed_set(self, allowed_special: AllowedSpecial | None) -> frozenset[str]:
        if allowed_special is None:
            return frozenset()
        if isinstance(allowed_special, str):
            if allowed_special == "all":
                return frozenset(self.special_tokens)
            raise ValueError(f"allowed_special={allowed_special!r}: expected 'all' or a set of special-token strings")
        allowed = frozenset(allowed_special)
        unknown = sorted(t for t in allowed if t not in self.special_tokens)
        if unknown:
            raise ValueError(f"allowed_special: {unknown[:5]} are not special tokens of this {self.kind} tokenizer")
        return allowed

    def encode(
        self, text: str, bos: bool = False, eos: bool = False, allowed_special: AllowedSpecial = ()
    ) -> list[int]:
        """Encode ``text`` to token ids.

        Args:
          text: any ``str`` (any length: Llama 3 input is split into 400,000-character windows and 25,000-character
            same-class runs, as the reference does).
          bos: prepend ``bos_id`` (not when the ids already start with it, e.g. text holding an allowed
            ``<|begin_of_text|>``: never two BOS).
          eos: append ``eos_id``.
          allowed_special: ``"all"`` or a set of special-token strings that are encoded as their ids; every other
            special-token text is encoded as plain text (default: all of it).
        Returns: list[int].
        Raises: TypeError for a non-str ``text``; ValueError for an unknown entry of ``allowed_special`` or
          ``bos``/``eos`` requested from a tokenizer without one.
        """
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode: text must be str, got {type(text).__name__}")
        allowed = self._allowed_set(allowed_special)
        ids: list[int] = []
        if allowed:
            pat = self._special_re_cache.get(allowed)
            if pat is None:
                pat = re.compile("|".join(re.escape(t) for t in sorted(allowed, key=len, reverse=True)))
                self._special_re_cache[allowed] = pat
            pos = 0
            for m in pat.finditer(text):
                if m.start() > pos:
                    ids.extend(self._backend.encode_plain(text[pos : m.start()]))
                ids.append(self.special_tokens[m.group()])
                pos = m.end()
            if pos < len(text):
                ids.extend(self._backend.encode_plain(text[pos:]))
        elif text:
            ids = self._backend.encode_plain(text)
        if bos:
            if self.bos_id is None:
                raise ValueError(f"encode(bos=True): this {self.kind} tokenizer ({self.source}) has no BOS token")
            if not ids or ids[0] != self.bos_id:
                ids.insert(0, self.bos_id)
        if eos:
            if self.eos_id is None:
                raise ValueError(f"encode(eos=True): this {self.kind} tokenizer ({self.source}) has no EOS token")
            ids.append(self.eos_id)
        return ids

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        out = []
        for pos, i in enumerate(ids):
            try:
                v = int(i)
            except (TypeError, ValueError):
                raise ValueError(f"decode: token at position {pos} is {i!r}, not an integer id") from None
            if v != i or not 0 <= v < self.vocab_size:
                raise ValueError(
                    f"decode: token id {i!r} at position {pos} is outside the vocabulary [0, {self.vocab_size})"
                )
            out.append(v)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids -> text (special tokens written as their text; invalid UTF-8 replaced by U+FFFD).

        Raises: ValueError naming the position of an id outside ``[0, vocab_size)`` (or not an integer).
        """
        ids = self._check_ids(ids)
        if not ids:
            return ""
        return self._backend.decode(ids)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Token ids -> raw UTF-8 bytes (for streaming: a character may span tokens). Llama 3 only is exact; other
        kinds return ``decode(ids).encode()``. Raises ValueError like :meth:`decode`."""
        ids = self._check_ids(ids)
        if hasattr(self._backend, "decode_bytes"):
            return self._backend.decode_bytes(ids)
        return self._backend.decode(ids).encode("utf-8") if ids else b""

    def id_to_token(self, i: int) -> str:
        """The text of one token id (special tokens by name). Raises ValueError outside the vocabulary."""
        return self.decode([i])

    def __repr__(self) -> str:
        return (
            f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id}, stop_ids={sorted(self.stop_ids)}, source={self.source!r})"
        )
