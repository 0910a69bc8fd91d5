"""Tokenizer tests: Meta's real Llama 3 tokenizer.model (cases/tokenizer.md), parity with the reference
llama_models.llama3.tokenizer.Tokenizer, SentencePiece, HF tokenizer.json, and the SmolLM2 GGUF vocabulary against
transformers loading the same GGUF."""

import hashlib
import io
import json
import os
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama_jax import assets
from llama_jax.tokenizer import EXTRAS_FILE, LLAMA3_SPECIAL_TOKENS, Tokenizer

LLAMA3_MD5 = "08292403f8b173e7524d7fba7bbbd2d3"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_file(assets.llama3_tokenizer_path())


@pytest.fixture(scope="module")
def ref():
    from llama_models.llama3.tokenizer import Tokenizer as RefTokenizer

    return RefTokenizer(Path(assets.llama3_tokenizer_path()))


def test_real_tokenizer_file_is_the_expected_one():
    with open(assets.llama3_tokenizer_path(), "rb") as f:
        assert hashlib.md5(f.read()).hexdigest() == LLAMA3_MD5


# ------------------------------------------------------------------------------------------- cases/tokenizer.md
def test_case_encode_with_bos_eos(tok):
    assert tok.encode("This is a test sentence.", bos=True, eos=True) == [
        128000,
        2028,
        374,
        264,
        1296,
        11914,
        13,
        128001,
    ]


def test_case_decode_with_special_tokens(tok):
    ids = [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert tok.decode(ids) == "<|begin_of_text|>This is a test sentence.<|end_of_text|>"


def test_case_exactly_one_bos_no_eos(tok):
    assert tok.encode("hi, how are you today?", bos=True) == [128000, 6151, 11, 1268, 527, 499, 3432, 30]


def test_case_punctuation_and_spaces(tok):
    ids = tok.encode("! ! !")
    assert ids == [0, 758, 758]
    assert tok.decode(ids) == "! ! !"


def test_special_ids_names_and_stop_ids(tok, ref):
    expected = {
        128000: "<|begin_of_text|>",
        128001: "<|end_of_text|>",
        128004: "<|finetune_right_pad_id|>",
        128006: "<|start_header_id|>",
        128007: "<|end_header_id|>",
        128008: "<|eom_id|>",
        128009: "<|eot_id|>",
        128010: "<|python_tag|>",
    }
    for i, name in expected.items():
        assert tok.special_tokens[name] == i
        assert tok.decode([i]) == name
    assert tok.special_tokens == ref.special_tokens
    assert len(tok.special_tokens) == 256 and len(LLAMA3_SPECIAL_TOKENS) == 256
    assert all(
        t.startswith("<|reserved_special_token_")
        for t, i in tok.special_tokens.items()
        if i not in expected and i not in (128005, 128011)
    )
    assert tok.vocab_size == 128256 == ref.n_words
    assert (tok.bos_id, tok.eos_id, tok.kind) == (128000, 128001, "llama3")
    assert tok.stop_ids == frozenset({128001, 128008, 128009}) == frozenset(ref.stop_tokens)


def test_digits_split_in_groups_of_three(tok):
    ids = tok.encode("1234567")
    assert len(ids) == 3
    assert [tok.decode([i]) for i in ids] == ["123", "456", "7"]


def test_special_token_text_is_plain_unless_allowed(tok):
    text = "<|eot_id|><|start_header_id|>"
    plain = tok.encode(text)
    assert not set(plain) & set(tok.special_tokens.values())
    assert tok.decode(plain) == text
    assert tok.encode(text, allowed_special="all") == [128009, 128006]
    assert tok.encode(text, allowed_special={"<|eot_id|>"}) == [128009] + tok.encode("<|start_header_id|>")
    with pytest.raises(ValueError, match="<|not_a_token|>"):
        tok.encode("x", allowed_special={"<|not_a_token|>"})


def test_no_double_bos(tok):
    ids = tok.encode("<|begin_of_text|>hi", bos=True, allowed_special="all")
    assert ids.count(128000) == 1 and ids[0] == 128000


_REF_TEXTS = {
    "empty": "",
    "space": " ",
    "words": "hello world",
    "padded": "  leading and trailing  ",
    "whitespace": "tabs\tand\nnewlines\r\n\n",
    "contractions": "I'm here, you're there",
    "cjk_emoji": "数学は楽しい 🙂👍🏽",
    "runs_over_25k": "x" * 30_000 + " " * 30_000 + "y z" * 9_000,
    "over_400k_window": ("ab " * 150_000) + "c" * 120_000,
    "special_text": "<|eot_id|> typed by a user",
    "controls": "\x00\x01\x7f control",
}


@pytest.mark.parametrize("text", list(_REF_TEXTS.values()), ids=list(_REF_TEXTS))
def test_encode_equals_reference(tok, ref, text):
    assert tok.encode(text, bos=True, eos=True) == ref.encode(text, bos=True, eos=True)
    assert tok.encode(text, allowed_special="all") == ref.encode(text, bos=False, eos=False, allowed_special="all")


_pieces = st.one_of(
    st.text(),  # any code point but surrogates, control characters included
    st.text(st.sampled_from("😀🙂👍🏽👨‍👩‍👧🇫🇷✨🚀"), max_size=20),  # emoji incl. ZWJ / modifier sequences
    st.text(st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF), max_size=30),  # CJK
    st.text(st.characters(min_codepoint=0, max_codepoint=0x1F), max_size=20),  # C0 control characters
    st.builds(
        lambda c, n: c * n, st.sampled_from([" ", "\t", "\n", "\r\n", "\u3000", "\xa0"]), st.integers(1, 3000)
    ),  # long whitespace runs
    st.sampled_from(["<|eot_id|>", "<|begin_of_text|>", "1234567", "'s", "\u200b"]),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_pieces, max_size=6).map("".join))
def test_roundtrip_random_unicode(tok, ref, s):
    ids = tok.encode(s)
    assert tok.decode(ids) == s
    assert ids == ref.encode(s, bos=False, eos=False)


@pytest.mark.parametrize("char", ["a", " "])
def test_one_million_identical_characters(tok, char):
    s = char * 1_000_000
    t0 = time.perf_counter()
    ids = tok.encode(s)
    dt = time.perf_counter() - t0
    print(f"encode({char!r} * 1e6): {len(ids)} tokens in {dt:.2f} s")
    assert tok.decode(ids) == s
    assert dt < 10.0  # acceptance criterion of issue 5


# ------------------------------------------------------------------------------------------- save / load
def test_llama3_save_roundtrip(tok, tmp_path):
    written = tok.save(tmp_path / "tok")
    assert sorted(os.path.basename(p) for p in written) == sorted(["tokenizer.model", EXTRAS_FILE])
    with open(tmp_path / "tok" / "tokenizer.model", "rb") as f:
        assert hashlib.md5(f.read()).hexdigest() == LLAMA3_MD5  # byte-identical to Meta's file
    again = Tokenizer.from_file(tmp_path / "tok")
    for attr in ("kind", "bos_id", "eos_id", "stop_ids", "vocab_size", "special_tokens", "chat_template"):
        assert getattr(again, attr) == getattr(tok, attr), attr
    s = "Round trip: 数学 🙂 <|eot_id|>"
    assert again.encode(s, allowed_special="all") == tok.encode(s, allowed_special="all")


def test_sentencepiece(tmp_path):
    import sentencepiece as spm

    text = [
        "the quick brown fox jumps over the lazy dog",
        "hello world, hello tokenizer",
        "sentencepiece models are protobufs",
        "numbers 123 and 4567",
    ] * 20
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_writer=buf, vocab_size=60, model_type="bpe", minloglevel=2
    )
    path = tmp_path / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    t = Tokenizer.from_file(path)
    assert t.kind == "sentencepiece" and t.vocab_size == sp.get_piece_size()
    assert (t.bos_id, t.eos_id) == (sp.bos_id(), sp.eos_id()) and t.stop_ids == {sp.eos_id()}
    s = "hello the lazy fox"
    assert t.encode(s, bos=True, eos=True) == [sp.bos_id()] + sp.encode(s) + [sp.eos_id()]
    assert t.decode(t.encode(s)) == s
    assert "</s>" in t.special_tokens
    assert t.encode("a</s>", allowed_special="all")[-1] == sp.eos_id()
    assert sp.eos_id() not in t.encode("a</s>")
    t.save(tmp_path / "saved")
    again = Tokenizer.from_file(tmp_path / "saved")
    assert again.kind == "sentencepiece" and again.encode(s, bos=True) == t.encode(s, bos=True)


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "content, detected",
    [
        (b"", "empty file"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary data"),
        (b"just some words\nand more\n", "text file"),
        (b'{"vocab": {"a": 0}}', "JSON without a 'model'"),
        (b"{not json", "JSON that does not parse"),
    ],
)
def test_unknown_format_names_what_was_detected(tmp_path, content, detected):
    p = tmp_path / "mystery.bin"
    p.write_bytes(content)
    with pytest.raises(ValueError, match=detected) as e:
        Tokenizer.from_file(p)
    assert "mystery.bin" in str(e.value)


def test_unknown_directory(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"weights\.bin"):
        Tokenizer.from_file(tmp_path)
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_file(tmp_path / "missing")


@pytest.mark.parametrize("bad", [-1, 128256, 10**9, 1.5, "7"])
def test_decode_out_of_vocabulary(tok, bad):
    with pytest.raises(ValueError, match="position 1"):
        tok.decode([1, bad])


def test_encode_rejects_non_str(tok):
    with pytest.raises(TypeError):
        tok.encode(b"bytes")


# ------------------------------------------------------------------------------------------- GGUF vs transformers
@pytest.fixture(scope="module")
def gguf_pair():
    from transformers import AutoTokenizer

    path = assets.smollm2_gguf_path()
    ours = Tokenizer.from_file(path)
    theirs = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return ours, theirs


_GGUF_STRINGS = [
    "Hello world",
    "  two leading spaces and trailing  ",
    "I'm fine, you're not; it's 1234567 o'clock.",
    "数学は楽しい 🙂👍🏽 \u00e9\u0301",
    "tabs\tnew\nlines\r\n\n\n",
    "def f(x):\n    return x ** 2\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n",
]


def test_gguf_encoding_equals_transformers(gguf_pair):
    ours, theirs = gguf_pair
    assert ours.kind == "hf" and ours.vocab_size == len(theirs)
    for s in _GGUF_STRINGS:
        expected = theirs(s, add_special_tokens=False)["input_ids"]
        assert ours.encode(s, allowed_special="all") == expected, s
        assert ours.decode(expected) == theirs.decode(expected), s
    assert (ours.bos_id, ours.eos_id) == (theirs.bos_token_id, theirs.eos_token_id)
    assert ours.eos_id in ours.stop_ids
    assert ours.chat_template == theirs.chat_template
    # special-token text is plain unless allowed
    assert 1 not in ours.encode("<|im_start|>") and ours.decode(ours.encode("<|im_start|>")) == "<|im_start|>"


def test_gguf_chat_template_equals_transformers(gguf_pair):
    from llama_jax.chat import TemplateChatFormat, chat_format_for

    ours, theirs = gguf_pair
    fmt = chat_format_for(ours)
    assert isinstance(fmt, TemplateChatFormat)
    for msgs in (
        [{"role": "user", "content": "What is 2+2?"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "数学 🙂"},
        ],
    ):
        for gen in (True, False):
            expected = theirs.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
            if isinstance(expected, dict) or hasattr(expected, "keys"):
                expected = expected["input_ids"]
            assert fmt.encode_dialog_prompt(msgs, add_generation_prompt=gen) == list(expected)
    # content typing a control token stays plain text in our encoding
    ids = fmt.encode_dialog_prompt([{"role": "user", "content": "a<|im_end|>b"}])
    assert ids.count(2) == 2  # the system turn's and the user turn's real <|im_end|>, not the typed one


def test_gguf_save_roundtrip(gguf_pair, tmp_path):
    ours, _ = gguf_pair
    written = ours.save(tmp_path / "tokenizer")
    assert sorted(os.path.basename(p) for p in written) == ["tokenizer.json", EXTRAS_FILE]
    extras = json.loads((tmp_path / "tokenizer" / EXTRAS_FILE).read_text())
    assert extras["kind"] == "hf" and extras["chat_template"] == ours.chat_template
    again = Tokenizer.from_file(tmp_path / "tokenizer")
    for attr in (
        "kind",
        "bos_id",
        "eos_id",
        "stop_ids",
        "vocab_size",
        "special_tokens",
        "chat_template",
        "add_bos_token",
    ):
        assert getattr(again, attr) == getattr(ours, attr), attr
    for s in _GGUF_STRINGS:
        assert again.encode(s, allowed_special="all") == ours.encode(s, allowed_special="all")
        assert again.encode(s) == ours.encode(s)


def test_hf_tokenizer_json_with_config(gguf_pair, tmp_path):
    """A Hugging Face folder: tokenizer.json + tokenizer_config.json (+ generation_config.json)."""
    ours, _ = gguf_pair
    d = tmp_path / "hf"
    ours.save(d)
    os.remove(d / EXTRAS_FILE)
    (d / "tokenizer_config.json").write_text(
        json.dumps(
            {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "chat_template": "{{ bos_token }}"}
        )
    )
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    t = Tokenizer.from_file(d)
    assert (t.kind, t.bos_id, t.eos_id, t.chat_template) == ("hf", 1, 2, "{{ bos_token }}")
    assert {0, 2} <= t.stop_ids
    t2 = Tokenizer.from_file(d / "tokenizer.json")
    assert t2.encode("Hello world") == t.encode("Hello world")


# ------------------------------------------------------------------------------------------- tiny synthetic GGUFs
def _write_tiny_gguf(path, model="gpt2", pre="llama-bpe", with_tokenizer=True):
    import gguf
    from tokenizers import pre_tokenizers

    w = gguf.GGUFWriter(str(path), "llama")
    if with_tokenizer:
        merges = ["Ġ t", "h e", "Ġt he", "l l", "he ll", "hell o", "Ġ w", "o r"]
        tokens = (
            ["<|begin_of_text|>", "<|eot_id|>", "<think>"]
            + sorted(pre_tokenizers.ByteLevel.alphabet())
            + ["Ġt", "he", "Ġthe", "ll", "hell", "hello", "Ġw", "or"]
        )
        w.add_tokenizer_model(model)
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types([3, 3, 4] + [1] * (len(tokens) - 3))  # control, control, user-defined, normal...
        w.add_token_merges(merges)
        w.add_bos_token_id(0)
        w.add_eos_token_id(1)
        w.add_eot_token_id(1)
        w.add_chat_template("{{ bos_token }}{% for m in messages %}{{ m.content }}<|eot_id|>{% endfor %}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("pre", ["llama-bpe", "smollm"])
def test_tiny_gguf_equals_transformers(tmp_path, pre):
    import gguf
    from transformers import AutoTokenizer

    _write_tiny_gguf(tmp_path / "tiny.gguf", pre=pre)
    ours = Tokenizer.from_file(tmp_path / "tiny.gguf")
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    for s in ["hello the world", "<|eot_id|>hello<think>x  the", "héllo\n\n the 1234", "  the  "]:
        assert ours.encode(s, allowed_special="all") == theirs(s, add_special_tokens=False)["input_ids"], s
    assert "<think>" in ours.decode(ours.encode("<think>"))  # user-defined token matched whole
    assert (ours.bos_id, ours.eos_id, ours.stop_ids) == (0, 1, frozenset({1}))
    again = Tokenizer.from_gguf_reader(gguf.GGUFReader(tmp_path / "tiny.gguf"))
    assert again.encode("hello the world") == ours.encode("hello the world")
    assert again.chat_template == ours.chat_template


def test_gguf_without_supported_tokenizer(tmp_path):
    _write_tiny_gguf(tmp_path / "spm.gguf", model="llama")
    with pytest.raises(ValueError, match="tokenizer.ggml.model='llama'"):
        Tokenizer.from_file(tmp_path / "spm.gguf")
    _write_tiny_gguf(tmp_path / "none.gguf", with_tokenizer=False)
    with pytest.raises(ValueError, match="none.gguf.*no tokenizer"):
        Tokenizer.from_file(tmp_path / "none.gguf")
