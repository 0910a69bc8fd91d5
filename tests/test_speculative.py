"""Issue 17: speculative decoding (prompt lookup, draft models) gives plain greedy's tokens and the target's
sampling distribution; ragged acceptance per row; bad drafts and CLI flags refused."""

import itertools
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from llama_jax import checkpoint, sampling, speculative
from llama_jax.chat import chat_format_for
from llama_jax.engine import Engine
from llama_jax.model import Llama
from llama_jax.tokenizer import Tokenizer
from tests.conftest import run_cli
from tests.numerics import logits_tolerance
from tests.reference import randomize, tiny_config
from tests.test_generate import CHAT_PROMPTS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEW = 40


# ------------------------------------------------------------------------------------------- SmolLM2, greedy
@pytest.fixture(scope="module")
def smol(smollm2_checkpoint):
    tokenizer = Tokenizer.from_file(checkpoint.tokenizer_dir(smollm2_checkpoint))
    fmt = chat_format_for(tokenizer)
    with open(os.path.join(REPO, "tests", "data", "eval_text.txt")) as f:
        passage = f.read()
    texts = [*CHAT_PROMPTS, "Summarise the following passage in three sentences.\n\n" + passage]
    prompts = [fmt.encode_dialog_prompt([{"role": "user", "content": p}]) for p in texts]
    engine = Engine(checkpoint.load(smollm2_checkpoint), max_length=1024)
    plain = engine.generate(prompts, max_new_tokens=NEW)  # no stop ids: all NEW tokens
    # a log-softmax moves by at most twice its logits' float32 rounding (D, L of the model, max |logit| of a text)
    logits = engine.model(jax.numpy.asarray([prompts[0] + plain[0].tokens]))
    tol = 2 * logits_tolerance(logits, engine.config.dim, engine.config.n_layers)
    return engine, prompts, plain, tokenizer, tol


def _check_identical(plain, spec, tol):
    for p, s in zip(plain, spec, strict=True):
        assert s.tokens == p.tokens
        # the verify pass computes T = k+1 rows at once: the same math, other float32 rounding
        np.testing.assert_allclose(s.logprobs, p.logprobs, rtol=0, atol=tol)
        assert s.speculative["proposed"] > 0


def test_prompt_lookup_greedy_identical_ragged_rows(smol):
    engine, prompts, plain, _, tol = smol
    spec = engine.generate(prompts, max_new_tokens=NEW, speculative="prompt_lookup", num_speculative=4, ngram=3)
    _check_identical(plain, spec, tol)
    rates = [c.speculative["acceptance_rate"] for c in spec]
    rounds = [c.speculative["rounds"] for c in spec]
    # one batch, rows of different lengths accepting different numbers of tokens: the summary copies the passage
    assert len(set(rounds)) > 1, rounds
    assert max(rates) > 0 and rates[3] > min(rates[:3]), rates


def test_prompt_lookup_without_a_match_takes_plain_steps(smol, monkeypatch):
    """A round where no row's n-gram matches proposes nothing: a one-token verify pass (a plain decode step), not
    k filler tokens; the tokens are still plain greedy's."""
    engine, prompts, plain, _, tol = smol
    seen = []

    def no_match(self, seq):
        seen.append(len(seq))
        return [int(seq[-1])] * self.num_speculative, 0

    monkeypatch.setattr(speculative.PromptLookup, "propose", no_match)
    (spec,) = engine.generate(prompts[:1], max_new_tokens=12, speculative="prompt_lookup", num_speculative=4)
    assert spec.tokens == plain[0].tokens[:12]
    np.testing.assert_allclose(spec.logprobs, plain[0].logprobs[:12], rtol=0, atol=tol)
    assert seen and spec.speculative["proposed"] == 0 and spec.speculative["rounds"] == 11, spec.speculative


def test_first_layers_self_draft_greedy_identical(smol, smollm2_checkpoint):
    engine, prompts, plain, _, tol = smol
    draft = speculative.self_draft(smollm2_checkpoint, layers=10)
    assert draft.config.n_layers == 10
    spec = engine.generate(prompts, max_new_tokens=NEW, speculative="draft", draft=draft, num_speculative=3)
    _check_identical(plain, spec, tol)
    assert speculative.acceptance_rate(spec) > 0


def test_int8_self_draft_greedy_identical_with_stops(smol, smollm2_checkpoint):
    engine, prompts, plain, _, tol = smol
    draft = speculative.self_draft(smollm2_checkpoint, quant="int8")
    spec = engine.generate(prompts, max_new_tokens=NEW, speculative="draft", draft=draft, num_speculative=4)
    _check_identical(plain, spec, tol)
    assert speculative.acceptance_rate(spec) > 0.5  # int8 weights rarely change the argmax
    # a stop id in the middle of an accepted run ends the row there, as without speculation
    stop = plain[0].tokens[7]
    ref = engine.generate(prompts[:1], max_new_tokens=NEW, stop_ids=[stop])[0]
    got = engine.generate(prompts[:1], max_new_tokens=NEW, stop_ids=[stop], speculative="draft", draft=draft)[0]
    assert got.tokens == ref.tokens and got.finish_reason == ref.finish_reason == "stop"


def test_stop_strings_and_streaming_as_without_speculation(smol):
    engine, prompts, plain, tokenizer, _ = smol
    text = tokenizer.decode(plain[3].tokens)
    stop = text[len(text) // 3 :][:6]  # a stop string in the middle of the summary (accepted runs are long there)
    kw = dict(max_new_tokens=NEW, stop_strings=[stop], tokenizer=tokenizer)
    ref = engine.generate(prompts[3:], **kw)[0]
    got = engine.generate(prompts[3:], speculative="prompt_lookup", **kw)[0]
    assert (got.tokens, got.text, got.finish_reason) == (ref.tokens, ref.text, ref.finish_reason)
    assert ref.finish_reason == "stop" and len(ref.tokens) < NEW
    items = list(engine.generate(prompts[:2], max_new_tokens=NEW, speculative="prompt_lookup", stream=True))
    final = items[-1]
    for row in range(2):
        streamed = [t for r, t, _ in items[:-1] if r == row]
        assert streamed == final[row].tokens == plain[row].tokens


# ------------------------------------------------------------------------------------------- sampling
VOCAB = 8
TINY = tiny_config(vocab_size=VOCAB, max_seq_len=64)
SETTINGS = dict(temperature=0.9, top_k=6, top_p=0.95)
DRAWS = 3000


def _tiny(seed, std=0.1):  # small weights: spread-out distributions over the 8 tokens
    return randomize(Llama(TINY, rngs=nnx.Rngs(seed)), seed, std=std)


def _exact_joint(model, prompt):
    """P(t1, t2, t3) [V, V, V] under the target's filtered distribution, from uncached forwards."""
    seqs = np.array([prompt + [a, b] for a, b in itertools.product(range(VOCAB), repeat=2)], np.int32)
    logits = np.asarray(model(jax.numpy.asarray(seqs)))  # [V*V, P+2, V]
    p = len(prompt)

    def probs(x):
        f = sampling.filter_logits(jax.numpy.asarray(x), **SETTINGS)
        return np.asarray(jax.nn.softmax(f, axis=-1), np.float64)

    p1 = probs(logits[:1, p - 1])[0]  # [V]
    p2 = probs(logits[::VOCAB, p])  # [V(t1), V]
    p3 = probs(logits[:, p + 1]).reshape(VOCAB, VOCAB, VOCAB)  # [t1, t2, t3]
    return p1[:, None, None] * p2[:, :, None] * p3


def _chi2_pvalue(tokens, joint):
    """p-value of the observed (t1, t2, t3) counts against ``joint``, cells with expected count < 5 merged."""
    counts = np.zeros(VOCAB**3)
    np.add.at(counts, np.ravel_multi_index(tokens.T, (VOCAB,) * 3), 1)
    expected = joint.ravel() * len(tokens)
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    pvalue = stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue  # float64 sums made equal exactly
    print(f"chi-square over {len(obs)} cells: p = {pvalue:.3g}")
    return pvalue


@pytest.fixture(scope="module")
def tiny():
    target = _tiny(0)
    engine = Engine(target, chunk_size=16)
    prompt = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2]  # repetitive: prompt lookup proposes real matches
    joint = _exact_joint(_tiny(0), prompt)
    return engine, prompt, joint


@pytest.mark.parametrize(
    "mode",
    ["plain", "prompt_lookup", "draft"],
)
def test_sampling_distribution_equals_target(tiny, mode):
    engine, prompt, joint = tiny
    kw = {}
    if mode != "plain":
        kw = dict(speculative=mode, num_speculative=2, ngram=2)
        if mode == "draft":
            kw["draft"] = _tiny(1, std=0.06)  # another model: its q differs from p, so rejections happen
    out = engine.generate([prompt] * DRAWS, max_new_tokens=3, seed=7, **SETTINGS, **kw)
    tokens = np.array([c.tokens for c in out])
    assert tokens.shape == (DRAWS, 3)
    if mode != "plain":
        rate = speculative.acceptance_rate(out)
        assert 0.05 < rate < 0.95, rate  # both accepting and rejecting were exercised
    excluded = joint[tuple(tokens.T)] == 0
    assert not excluded.any()  # never a token the filters exclude
    # fixed seed: deterministic; 1e-3 is far below the p-value of a correct sampler's typical draw
    assert _chi2_pvalue(tokens, joint) > 1e-3


def test_sampling_rule_detects_a_wrong_distribution(tiny):
    """The chi-square check has power: draws from a different temperature are rejected."""
    engine, prompt, joint = tiny
    out = engine.generate([prompt] * DRAWS, max_new_tokens=3, seed=7, **{**SETTINGS, "temperature": 1.3})
    assert _chi2_pvalue(np.array([c.tokens for c in out]), joint) < 1e-3


def test_accept_rule_mixed_greedy_and_sampled_rows():
    """accept() on given logits: a temperature-0 row takes the argmax path inside a sampling batch."""
    rng = np.random.default_rng(0)
    logits = jax.numpy.asarray(rng.normal(size=(2, 3, VOCAB)).astype(np.float32))
    argmax = np.argmax(np.asarray(logits), -1)
    drafts = jax.numpy.asarray(np.stack([argmax[0, :2], argmax[1, :2]]).astype(np.int32))
    mode = speculative.SamplingMode(greedy=False)
    t = jax.numpy.asarray([0.0, 1.0])
    tokens, n = speculative.accept(logits, drafts, None, jax.random.key(0), t, 0, 1.0, 0.0, mode)
    assert int(n[0]) == 2 and int(tokens[0, 2]) == argmax[0, 2]  # greedy row: argmaxes accepted + bonus
    wrong = jax.numpy.asarray((argmax[:, :2] + 1) % VOCAB, dtype=np.int32)
    tokens, n = speculative.accept(logits, wrong, None, jax.random.key(0), t, 0, 1.0, 0.0, mode)
    assert int(n[0]) == 0 and int(tokens[0, 0]) == argmax[0, 0]  # rejected, corrected to the argmax


def test_draft_cache_dtype(tiny):
    """A draft keeps its own KV cache in bfloat16 by default (kv_dtype=None: the draft's dtype); either way the
    greedy tokens are plain greedy decoding's, and an unknown kv_dtype is refused by name."""
    engine, prompt, _ = tiny
    plain = engine.generate([prompt], max_new_tokens=6)[0].tokens
    for kv_dtype, want in (("bfloat16", jax.numpy.bfloat16), (None, jax.numpy.float32)):
        draft = speculative.DraftModel(_tiny(1, std=0.06), num_speculative=2, kv_dtype=kv_dtype)
        assert draft.engine(engine).new_cache(1, 8).k.dtype == want
        got = engine.generate([prompt], max_new_tokens=6, speculative="draft", draft=draft)[0]
        assert got.tokens == plain and got.speculative["proposed"] > 0
    with pytest.raises(ValueError, match="kv_dtype"):
        speculative.DraftModel(_tiny(1), kv_dtype="float8")


# ------------------------------------------------------------------------------------------- errors
def test_draft_with_another_vocabulary_refused(tiny):
    engine, prompt, _ = tiny
    other = randomize(Llama(tiny_config(vocab_size=16, max_seq_len=64), rngs=nnx.Rngs(2)), 2)
    with pytest.raises(ValueError, match=r"draft model vocabulary \(16 tokens\).*target's \(8 tokens\)"):
        engine.generate([prompt], max_new_tokens=3, speculative="draft", draft=other)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(speculative="medusa"), "speculative must be one of"),
        (dict(speculative="draft"), "needs a draft model"),
        (dict(speculative="prompt_lookup", num_speculative=0), "num_speculative must be >= 1"),
        (dict(speculative="prompt_lookup", ngram=1), "ngram must be >= 2"),
    ],
)
def test_bad_api_values_refused(tiny, kw, match):
    engine, prompt, _ = tiny
    with pytest.raises(ValueError, match=match):
        engine.generate([prompt], max_new_tokens=3, **kw)


def test_prompt_lookup_proposals():
    pl = speculative.PromptLookup(ngram=3, num_speculative=4)
    assert pl.propose([7, 1, 2, 3, 9, 9, 1, 2, 3]) == ([9, 9], 2)  # the 3-gram (1, 2, 3) seen before: 3 - 1 tokens
    assert pl.propose([7, 1, 2, 3, 8, 5, 2, 3]) == ([8], 1)  # the 2-gram (2, 3): 1 token
    assert pl.propose([7, 1, 2, 3, 8, 5, 3]) == ([], 0)  # a 1-token match proposes nothing
    assert pl.propose([1, 2, 3]) == ([], 0)  # no match: nothing proposed
    pl = speculative.PromptLookup(ngram=8, num_speculative=4)
    seq = [9, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6]
    assert pl.propose(seq) == ([7, 8, 1, 2], 4)  # a 6-token match: min(k, 5) = k tokens
    assert pl.propose(seq[:-3]) == ([4, 5], 2)  # (1, 2, 3): 2 tokens
    assert pl.propose([4, 1, 2, 3, 1, 2, 3]) == ([1, 2], 2)  # the longest match wins: (1, 2, 3), not (3,)
    assert pl.propose([5, 1, 2, 5, 1, 2]) == ([5, 1], 2)  # (5, 1, 2) ends where the copy is: 2 of 2
    pl = speculative.PromptLookup(ngram=8, num_speculative=6)
    assert pl.propose([1, 2, 3, 4, 1, 2, 3, 4]) == ([1, 2, 3], 3)  # (1, 2, 3, 4): 3 tokens
    assert pl.propose([7, 7, 7, 7, 7]) == ([7, 7, 7], 1)  # the match (4 sevens) runs into the end: filler


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--speculative=medusa"], "--speculative"),
        (["--speculative=draft"], "--draft_checkpoint"),
        (["--speculative=prompt_lookup", "--num_speculative=0"], "--num_speculative"),
        (["--speculative=prompt_lookup", "--ngram=1"], "--ngram"),
        (["--speculative=draft", "--draft_layers=0"], "--draft_layers"),
        (["--speculative=draft", "--draft_checkpoint=/nonexistent/dir"], "--draft_checkpoint"),
        (["--draft_layers=3"], "--speculative"),
    ],
)
def test_cli_flag_errors(smollm2_checkpoint, args, flag):
    r = run_cli("llama_jax.generate", f"--checkpoint={smollm2_checkpoint}", "--prompt=hi", *args)
    assert r.returncode != 0
    assert flag in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_cli_json_reports_acceptance(smollm2_checkpoint):
    r = run_cli(
        "llama_jax.generate",
        f"--checkpoint={smollm2_checkpoint}",
        "--prompt=one two three one two three one two",
        "--max_new_tokens=8",
        "--json",
        "--speculative=draft",
        "--draft_layers=6",
        "--num_speculative=3",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads(r.stdout.strip().splitlines()[0])
    assert 0.0 <= rec["speculative"]["acceptance_rate"] <= 1.0 and rec["speculative"]["proposed"] > 0
