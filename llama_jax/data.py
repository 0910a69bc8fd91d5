"""Fine-tuning data: plain text / JSONL -> tokens -> packed fixed-length rows, and chat SFT loss masks.

Pipeline (all numpy, host side):

  read_documents(path)            .txt (one document per file) or .jsonl (one {"text": ...} or
                                  {"messages": [{"role", "content"}, ...]} object per line)
  tokenize_documents(docs, ...)   -> list of (tokens int32 [n], weights float32 [n]); weight 1 marks a token the
                                  loss may predict (every token of plain text; only assistant tokens of a chat)
  pack_documents(docs, seq_len)   -> dict of [R, T] arrays (see :func:`pack_documents`)
  Loader(rows, batch_size, ...)   -> batches [A, B, T] in a seeded order; ``state()`` / ``restore()`` give the
                                  position in the data, which the trainer stores in its checkpoints

Packing concatenates the documents into one stream and cuts it into rows of T inputs (row r covers stream
positions [r*T, r*T + T] so that every next-token pair of the stream is in exactly one row). Documents sharing a
row are kept apart by segment ids (attention, :func:`llama_jax.model.attention_mask`) and by the loss mask (the
last token of a document never predicts the first token of the next one). Positions restart at 0 at each
document start inside a row (a document split over rows restarts in the next row).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

BATCH_KEYS = ("tokens", "targets", "loss_mask", "positions", "segment_ids")


# ---------------------------------------------------------------------------------------------------- reading
@dataclasses.dataclass(frozen=True)
class Document:
    """One training document: plain ``text``, or a chat ``messages`` list of {"role", "content"} dicts."""

    text: str | None = None
    messages: tuple | None = None
    source: str = ""  # "file:line" for error messages


def read_documents(path: str | os.PathLike) -> list[Document]:
    """Reads a ``.txt`` file (one document) or a ``.jsonl`` file (one document per non-blank line).

    A JSONL line is an object with ``"text"`` (a string) or ``"messages"`` (a list of objects with string
    ``"role"`` and ``"content"``).

    Raises:
      FileNotFoundError: no such file.
      ValueError: an invalid JSONL line (the message gives ``path:line``), or an empty dataset (no non-empty
        document).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    docs: list[Document] = []
    if path.endswith(".jsonl"):
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{where}: not valid UTF-8 (byte {e.start + 1} of the line)") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: line {lineno} is not valid JSON ({e.msg})") from None
                docs.append(_document_from_json(obj, where))
    else:
        with open(path, "rb") as f:
            raw = f.read()
        try:
            docs.append(Document(text=raw.decode("utf-8"), source=path))
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise ValueError(f"{path}:{line}: not valid UTF-8 (byte offset {e.start})") from None
    docs = [d for d in docs if (d.text if d.text is not None else d.messages)]
    if not docs:
        raise ValueError(f"{path}: empty dataset (no non-empty document)")
    return docs


def _document_from_json(obj, where: str) -> Document:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object with 'text' or 'messages', got {type(obj).__name__}")
    if "text" in obj:
        if not isinstance(obj["text"], str):
            raise ValueError(f"{where}: 'text' must be a string")
        return Document(text=obj["text"], source=where)
    if "messages" in obj:
        from llama_jax import chat

        msgs = obj["messages"]
        if not isinstance(msgs, list):
            raise ValueError(f"{where}: 'messages' must be a list")
        for i, m in enumerate(msgs):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise ValueError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
        if msgs:
            chat.validate_messages(msgs, f"{where}: messages")  # the validator generation uses: same roles
        return Document(messages=tuple(dict(role=m["role"], content=m["content"]) for m in msgs), source=where)
    raise ValueError(f"{where}: expected a 'text' or 'messages' field, got {sorted(obj)}")


# ---------------------------------------------------------------------------------------------------- chat
@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """How a dialog is rendered, piece by piece, so that each token knows which message it came from.

    A message renders as ``header.format(role=role) + content + footer``; the dialog starts with ``prefix``.
    In SFT only the assistant's ``content + footer`` tokens are trained (the footer is the end-of-turn token,
    which teaches the model to stop). Each piece is tokenized separately and the token lists are concatenated.

    Presets: :data:`LLAMA3` (Llama 3.1 format, ``llama_models/llama3/chat_format.py``) and :data:`CHATML`
    (SmolLM2 and other ChatML models).
    """

    prefix: str
    header: str
    footer: str
    trained_roles: tuple = ("assistant",)


LLAMA3 = ChatTemplate(
    prefix="<|begin_of_text|>", header="<|start_header_id|>{role}<|end_header_id|>\n\n", footer="<|eot_id|>"
)
CHATML = ChatTemplate(prefix="", header="<|im_start|>{role}\n", footer="<|im_end|>\n")


def encode_dialog(
    messages: Sequence[Mapping[str, str]],
    encode: Callable[[str], Sequence[int]],
    template: ChatTemplate,
    encode_content: Callable[[str], Sequence[int]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and loss weights of a dialog.

    Args:
      messages: [{"role": ..., "content": ...}, ...].
      encode: text -> token ids, parsing the template's special tokens (e.g. an HF ``tokenizers`` encode).
      template: the rendering.
      encode_content: text -> token ids for message content (untrusted text: pass an encoder that keeps
        special-token text plain, so only the template writes special tokens); None: ``encode``.

    Returns:
      (tokens int32 [n], weights float32 [n]) with weight 1 exactly on the tokens of the trained roles'
      ``content + footer``.
    """
    toks: list[int] = []
    wts: list[float] = []

    def add(text: str, weight: float):
        if text:
            ids = list(encode(text))
            toks.extend(ids)
            wts.extend([weight] * len(ids))

    def add_content(text: str, weight: float):
        if encode_content is None:
            add(text + template.footer, weight)
        else:
            if text:
                ids = list(encode_content(text))
                toks.extend(ids)
                wts.extend([weight] * len(ids))
            add(template.footer, weight)

    add(template.prefix, 0.0)
    for m in messages:
        trained = 1.0 if m["role"] in template.trained_roles else 0.0
        add(template.header.format(role=m["role"]), 0.0)
        add_content(m["content"], trained)
    return np.asarray(toks, np.int32), np.asarray(wts, np.float32)


# ---------------------------------------------------------------------------------------------------- tokenizing
def tokenize_documents(
    docs: Iterable[Document],
    encode: Callable[[str], Sequence[int]],
    *,
    bos_id: int | None = None,
    eos_id: int | None = None,
    chat_template: ChatTemplate | None = None,
    encode_dialog_fn: Callable | None = None,
    encode_template: Callable[[str], Sequence[int]] | None = None,
    encode_content: Callable[[str], Sequence[int]] | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Documents -> [(tokens int32 [n], weights float32 [n])].

    Plain text becomes ``[bos] + encode(text) + [eos]`` (bos/eos when given), every token weighted 1 (the bos is
    never a target anyway). A chat becomes :func:`encode_dialog` (or ``encode_dialog_fn(messages)`` when given,
    returning the same pair). With ``encode_template`` the template's pieces are encoded by it (parsing special
    tokens) and message content by ``encode`` (training data is untrusted text: only the template writes special
    tokens) and message content by ``encode_content`` (default ``encode``); without it ``encode`` does both.

    Raises:
      ValueError: a chat document without ``chat_template`` / ``encode_dialog_fn`` (naming the source line), or
        no document with a trainable target.
    """
    out = []
    for d in docs:
        if d.text is not None:
            ids = (
                ([bos_id] if bos_id is not None else [])
                + list(encode(d.text))
                + ([eos_id] if eos_id is not None else [])
            )
            out.append((np.asarray(ids, np.int32), np.ones(len(ids), np.float32)))
        else:
            if encode_dialog_fn is not None:
                toks, w = encode_dialog_fn(d.messages)
            elif chat_template is not None and encode_template is not None:
                toks, w = encode_dialog(
                    d.messages, encode_template, chat_template, encode_content=encode_content or encode
                )
            elif chat_template is not None:
                toks, w = encode_dialog(d.messages, encode, chat_template)
            else:
                raise ValueError(f"{d.source}: a chat document needs a chat template")
            out.append((np.asarray(toks, np.int32), np.asarray(w, np.float32)))
    if not any(len(t) > 1 and w[1:].sum() > 0 for t, w in out):
        raise ValueError("empty dataset: no document has a token to train on")
    return out


def tokenize_for_training(
    docs: Iterable[Document], tokenizer, chat_template: str = "auto", allow_special_in_data: bool = False
) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`tokenize_documents` with a :class:`llama_jax.tokenizer.Tokenizer`, as ``experiments/finetune.py``
    runs it.

    Training data is untrusted text: ``"<|eot_id|>"`` or ``"<|im_end|>"`` typed in a document or a message is
    encoded as plain text, and only the chat format writes special tokens (as generation does). With
    ``allow_special_in_data`` the special-token text of plain ``"text"`` documents (pre-formatted data) becomes
    special tokens; message content stays plain text either way.

    Args:
      chat_template: "auto" (Meta's Llama 3.1 format, :meth:`llama_jax.chat.ChatFormat.encode_dialog_for_training`,
        for a Llama 3 vocabulary, else ChatML), "chatml" or "llama3" (:data:`CHATML` / :data:`LLAMA3`).
    Raises: ValueError like :func:`tokenize_documents`, or for an unknown ``chat_template``.
    """
    templates = {"chatml": CHATML, "llama3": LLAMA3, "auto": CHATML}
    if chat_template not in templates:
        raise ValueError(f"chat_template={chat_template!r}; expected one of {sorted(templates)}")
    dialog_fn = None
    if chat_template == "auto" and all(t in tokenizer.special_tokens for t in ("<|start_header_id|>", "<|eot_id|>")):
        from llama_jax import chat

        dialog_fn = chat.chat_format_for(tokenizer).encode_dialog_for_training
    text_special = "all" if allow_special_in_data else ()
    return tokenize_documents(
        docs,
        lambda s: tokenizer.encode(s, allowed_special=text_special),
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        chat_template=templates[chat_template],
        encode_dialog_fn=dialog_fn,
        encode_template=lambda s: tokenizer.encode(s, allowed_special="all"),
        encode_content=tokenizer.encode,
    )


# ---------------------------------------------------------------------------------------------------- packing
def pack_documents(
    docs: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int = 0
) -> dict[str, np.ndarray]:
    """Packs tokenized documents into R rows of ``seq_len`` (T) inputs.

    Returns a dict of numpy arrays, each [R, T]:
      tokens int32: inputs; targets int32: the next token of the stream; loss_mask float32: the target's weight
      where the target is in the same document as the input, else 0 (also 0 on padding);
      positions int32: position within the document part in this row (restarting at each document start);
      segment_ids int32: 1, 2, ... per document part in the row, 0 on padding.

    Raises:
      ValueError: ``seq_len`` < 1, or no document tokens.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    docs = [(t, w) for t, w in docs if len(t)]
    if not docs:
        raise ValueError("empty dataset: no tokens to pack")
    tokens = np.concatenate([t for t, _ in docs]).astype(np.int32)
    weights = np.concatenate([w for _, w in docs]).astype(np.float32)
    doc = np.concatenate([np.full(len(t), i, np.int64) for i, (t, _) in enumerate(docs)])
    n = len(tokens)
    rows = max(1, -(-(n - 1) // seq_len))
    total = rows * seq_len + 1
    pad = total - n
    tokens = np.concatenate([tokens, np.full(pad, pad_id, np.int32)])
    weights = np.concatenate([weights, np.zeros(pad, np.float32)])
    doc = np.concatenate([doc, np.full(pad, -1, np.int64)])

    idx = np.arange(rows)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]  # [R, T+1]
    win_tok, win_w, win_doc = tokens[idx], weights[idx], doc[idx]
    inp_doc, tgt_doc = win_doc[:, :-1], win_doc[:, 1:]
    valid = (inp_doc == tgt_doc) & (inp_doc >= 0)
    loss_mask = np.where(valid, win_w[:, 1:], 0.0).astype(np.float32)

    starts = np.ones_like(inp_doc, bool)
    starts[:, 1:] = inp_doc[:, 1:] != inp_doc[:, :-1]
    seg = np.cumsum(starts, axis=1).astype(np.int32)
    seg = np.where(inp_doc >= 0, seg, 0).astype(np.int32)
    col = np.broadcast_to(np.arange(seq_len), inp_doc.shape)
    start_col = np.maximum.accumulate(np.where(starts, col, 0), axis=1)
    positions = (col - start_col).astype(np.int32)
    return dict(
        tokens=win_tok[:, :-1].copy(),
        targets=win_tok[:, 1:].copy(),
        loss_mask=loss_mask,
        positions=positions,
        segment_ids=seg,
    )


# ---------------------------------------------------------------------------------------------------- loading
class Loader:
    """Batches of packed rows in a deterministic, seeded order, with a resumable position.

    Epoch e visits the rows in ``np.random.default_rng([seed, e]).permutation(R)`` order (or in order when
    ``shuffle`` is False). ``next()`` returns a dict of arrays [A, B, T] (A = ``grad_accum`` micro-batches of
    B = ``batch_size`` rows), continuing into the next epoch when one runs out. ``state()`` is a JSON-able
    {"epoch", "cursor", "seed"}; ``restore(state)`` continues from it exactly.

    Raises:
      ValueError: empty rows, or a batch size / grad_accum < 1.
    """

    def __init__(
        self,
        rows: Mapping[str, np.ndarray],
        batch_size: int,
        *,
        grad_accum: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ):
        if batch_size < 1 or grad_accum < 1:
            raise ValueError(f"batch_size and grad_accum must be >= 1, got {batch_size}, {grad_accum}")
        missing = [k for k in BATCH_KEYS if k not in rows]
        if missing:
            raise ValueError(f"rows lack {missing}")
        self.rows = {k: np.asarray(rows[k]) for k in BATCH_KEYS}
        self.num_rows = len(self.rows["tokens"])
        if self.num_rows == 0:
            raise ValueError("empty dataset: no packed rows")
        self.batch_size, self.grad_accum, self.seed, self.shuffle = batch_size, grad_accum, seed, shuffle
        self.epoch, self.cursor = 0, 0

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_rows)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)

    def state(self) -> dict:
        return {"epoch": int(self.epoch), "cursor": int(self.cursor), "seed": int(self.seed)}

    def restore(self, state: Mapping) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"data state was saved with seed {state['seed']}, this loader has seed {self.seed}")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])

    def next(self) -> dict[str, np.ndarray]:
        need = self.batch_size * self.grad_accum
        picks = []
        while need:
            order = self._order(self.epoch)
            take = order[self.cursor : self.cursor + need]
            picks.append(take)
            need -= len(take)
            self.cursor += len(take)
            if self.cursor >= self.num_rows:
                self.epoch, self.cursor = self.epoch + 1, 0
        idx = np.concatenate(picks).reshape(self.grad_accum, self.batch_size)
        return {k: v[idx] for k, v in self.rows.items()}


def split_rows(rows: Mapping[str, np.ndarray], holdout_fraction: float, seed: int = 0):
    """Splits packed rows into (train, held-out) by a seeded permutation; at least one row each when R >= 2."""
    n = len(rows["tokens"])
    perm = np.random.default_rng(seed).permutation(n)
    k = min(max(1, int(round(n * holdout_fraction))), n - 1) if n >= 2 else 0
    held, train = perm[:k], perm[k:]
    return {k_: v[train] for k_, v in rows.items()}, {k_: v[held] for k_, v in rows.items()}
