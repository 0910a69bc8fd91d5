"""Tests of llama_jax.data: packing invariants, loader determinism and resume, chat SFT masks, bad input."""

import collections
import json
import re

import numpy as np
import pytest

from llama_jax import data


def _random_docs(seed, n_docs=7, max_len=40, vocab=50):
    rng = np.random.default_rng(seed)
    return [
        (
            rng.integers(1, vocab, size=int(rng.integers(1, max_len))).astype(np.int32),
            (rng.random(max_len) > 0.3).astype(np.float32),
        )
        for _ in range(n_docs)
    ]


def _fix_weights(docs):
    return [(t, w[: len(t)]) for t, w in docs]


@pytest.mark.parametrize("seed,seq_len", [(0, 8), (1, 16), (2, 5), (3, 64)])
def test_packing_trains_each_in_document_pair_once(seed, seq_len):
    docs = _fix_weights(_random_docs(seed))
    rows = data.pack_documents(docs, seq_len)
    # reference: every (token, next token) pair inside a document whose target weight is > 0
    want = collections.Counter()
    for t, w in docs:
        for i in range(len(t) - 1):
            if w[i + 1] > 0:
                want[(int(t[i]), int(t[i + 1]), float(w[i + 1]))] += 1
    got = collections.Counter()
    m = rows["loss_mask"]
    for r, c in zip(*np.nonzero(m), strict=False):
        got[(int(rows["tokens"][r, c]), int(rows["targets"][r, c]), float(m[r, c]))] += 1
    assert got == want
    assert all(v.shape == rows["tokens"].shape for v in rows.values())


def test_packing_segments_and_positions_follow_documents():
    docs = [
        (np.arange(1, 6, dtype=np.int32), np.ones(5, np.float32)),  # 5 tokens
        (np.arange(10, 13, dtype=np.int32), np.ones(3, np.float32)),  # 3 tokens
        (np.arange(20, 30, dtype=np.int32), np.ones(10, np.float32)),
    ]  # 10 tokens
    rows = data.pack_documents(docs, 8)
    # stream: 1..5 | 10..12 | 20..29 (18 tokens) -> rows of 8 inputs: ceil(17 / 8) = 3 rows
    assert rows["tokens"].shape == (3, 8)
    np.testing.assert_array_equal(rows["tokens"][0], [1, 2, 3, 4, 5, 10, 11, 12])
    np.testing.assert_array_equal(rows["segment_ids"][0], [1, 1, 1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(rows["positions"][0], [0, 1, 2, 3, 4, 0, 1, 2])
    np.testing.assert_array_equal(rows["loss_mask"][0], [1, 1, 1, 1, 0, 1, 1, 0])  # 5->10 and 12->20 masked
    np.testing.assert_array_equal(rows["targets"][0], [2, 3, 4, 5, 10, 11, 12, 20])
    # last row: 28, 29 then padding (segment 0, no loss)
    np.testing.assert_array_equal(rows["segment_ids"][2], [1, 1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(rows["loss_mask"][2], [1, 0, 0, 0, 0, 0, 0, 0])


def test_loader_is_seeded_and_resumes_exactly():
    rows = data.pack_documents(_fix_weights(_random_docs(0, n_docs=20)), 8)
    a = data.Loader(rows, 3, grad_accum=2, seed=5)
    batches = [a.next() for _ in range(6)]
    assert batches[0]["tokens"].shape == (2, 3, 8)
    b = data.Loader(rows, 3, grad_accum=2, seed=5)
    for _ in range(2):
        b.next()
    c = data.Loader(rows, 3, grad_accum=2, seed=5)
    c.restore(json.loads(json.dumps(b.state())))
    for i in range(2, 6):
        batch = c.next()
        for k in data.BATCH_KEYS:
            np.testing.assert_array_equal(batch[k], batches[i][k])
    # one epoch visits every row once
    d = data.Loader(rows, 1, seed=1)
    seen = [tuple(d.next()["tokens"][0, 0]) for _ in range(len(rows["tokens"]))]
    assert sorted(seen) == sorted(tuple(r) for r in rows["tokens"])
    other = data.Loader(rows, 3, grad_accum=2, seed=6)
    assert not np.array_equal(other.next()["tokens"], batches[0]["tokens"])
    with pytest.raises(ValueError, match="seed"):
        other.restore(a.state())


class _ToyTokenizer:
    """Word-level tokenizer that parses <|...|> special tokens: each word, space run, newline or special -> id."""

    def __init__(self):
        self.vocab = {}

    def encode(self, text):
        pieces = re.findall(r"<\|[a-z_]+\|>|\w+|\s|[^\w\s]", text)
        return [self.vocab.setdefault(p, len(self.vocab) + 1) for p in pieces]


@pytest.mark.parametrize("template", [data.LLAMA3, data.CHATML])
def test_chat_sft_mask_counts_exactly_the_assistant_tokens(template):
    tok = _ToyTokenizer()
    dialog = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Four."},
        {"role": "user", "content": "And three plus three?"},
        {"role": "assistant", "content": "Six, of course."},
    ]
    # hand count: the assistant tokens are each reply's content plus the template footer
    assistant = []
    for m in dialog:
        if m["role"] == "assistant":
            assistant += tok.encode(m["content"]) + tok.encode(template.footer)
    toks, weights = data.encode_dialog(dialog, tok.encode, template)
    assert int(weights.sum()) == len(assistant)
    rows = data.pack_documents([(toks, weights)], seq_len=16)
    mask = rows["loss_mask"].reshape(-1) > 0
    trained_targets = rows["targets"].reshape(-1)[mask]
    assert trained_targets.tolist() == assistant  # exactly the assistant tokens, in order
    # the whole render is the concatenation of the pieces
    rendered = template.prefix + "".join(
        template.header.format(role=m["role"]) + m["content"] + template.footer for m in dialog
    )
    assert toks.tolist() == tok.encode(rendered)


def test_read_documents_text_and_chat(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "hello world"}\n\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    docs = data.read_documents(p)
    assert [d.text for d in docs] == ["hello world", None]
    assert docs[1].messages[0]["content"] == "hi"
    t = tmp_path / "d.txt"
    t.write_text("plain text body\n")
    assert data.read_documents(t)[0].text == "plain text body\n"
    tok = _ToyTokenizer()
    out = data.tokenize_documents(docs, tok.encode, bos_id=100, eos_id=101, chat_template=data.LLAMA3)
    assert out[0][0].tolist()[0] == 100 and out[0][0].tolist()[-1] == 101


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_dataset_is_refused(tmp_path, content):
    p = tmp_path / "empty.jsonl"
    p.write_text(content)
    with pytest.raises(ValueError, match="empty dataset"):
        data.read_documents(p)
    t = tmp_path / "empty.txt"
    t.write_text("")
    with pytest.raises(ValueError, match="empty dataset"):
        data.read_documents(t)
    with pytest.raises(ValueError, match="empty dataset"):
        data.pack_documents([], 8)
    with pytest.raises(ValueError, match="empty dataset"):
        data.tokenize_documents([data.Document(text="x")], lambda s: [1])  # one token: nothing to predict


def test_invalid_jsonl_line_is_named(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"text": "ok too"}\n{"text": "broken\n{"text": "fine"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: line 3 is not valid JSON"):
        data.read_documents(p)
    p.write_text('{"text": "ok"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        data.read_documents(p)
    p.write_text('{"messages": [{"role": "user"}]}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: messages\[0\]"):
        data.read_documents(p)
    p.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: expected a 'text' or 'messages'"):
        data.read_documents(p)


def test_chat_mask_agrees_with_llama3_chat_format():
    """Our piecewise LLAMA3 rendering == llama_jax.chat's ChatFormat (tokens and SFT weights), real tokenizer."""
    from llama_jax import assets, chat
    from llama_jax.tokenizer import Tokenizer

    tok = Tokenizer.from_file(assets.llama3_tokenizer_path())
    fmt = chat.chat_format_for(tok)
    dialog = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Four."},
        {"role": "user", "content": "And three plus three?"},
        {"role": "assistant", "content": "Six, of course."},
    ]
    ids, w = fmt.encode_dialog_for_training(dialog)
    ours, our_w = data.encode_dialog(dialog, lambda s: tok.encode(s, allowed_special="all"), data.LLAMA3)
    assert ours.tolist() == list(ids) and our_w.tolist() == list(w)
    eot = tok.special_tokens["<|eot_id|>"]
    expect = tok.encode("Four.") + [eot] + tok.encode("Six, of course.") + [eot]
    out = data.tokenize_documents(
        [data.Document(messages=tuple(dialog))], None, encode_dialog_fn=fmt.encode_dialog_for_training
    )
    rows = data.pack_documents(out, seq_len=32)
    assert rows["targets"][rows["loss_mask"] > 0].tolist() == expect
