"""experiments/eval.py: sliding-window perplexity == transformers on the same GGUF and windows; multiple-choice
scores == a direct per-choice log-likelihood computation; bad JSONL lines reported by line number."""

import json
import math
import os
import sys

import numpy as np
import pytest

from tests.conftest import REPO, run_cli

sys.path.insert(0, os.path.join(REPO, "experiments"))
import eval as ev  # noqa: E402

from tests.numerics import relative_tolerance

TEXT = os.path.join(REPO, "tests", "data", "eval_text.txt")
MC = os.path.join(REPO, "tests", "data", "mc20.jsonl")


@pytest.fixture(scope="module")
def smol(smollm2_checkpoint):
    model, tokenizer = ev.load_model(smollm2_checkpoint)
    return ev.Scorer(model, batch_size=8), tokenizer


def test_windows_score_every_token_once():
    for n, w, s in [(10, 4, 2), (100, 16, 16), (100, 16, 15), (37, 8, 3), (5, 128, 64), (129, 128, 64)]:
        wins = ev.windows(n, w, s)
        scored = []
        for b, e, k in wins:
            assert e - b <= w and 1 <= k <= e - b - 1
            scored += list(range(e - k, e))
        if s < w:
            assert scored == list(range(1, n)), (n, w, s)
        else:  # disjoint windows: each window's first token has no context in it (HF's scheme too)
            assert scored == [t for t in range(1, n) if t % w], (n, w, s)
    with pytest.raises(ValueError, match="--stride"):
        ev.windows(10, 4, 5)


def _hf_perplexity(hf, ids, window, stride):
    import torch

    nll, count = 0.0, 0
    for b, e, k in ev.windows(len(ids), window, stride):
        with torch.no_grad():
            logits = hf(torch.tensor([ids[b:e]])).logits[0].double()
        logp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[b + 1 : e])[:, None])[:, 0]
        nll -= float(logp[-k:].sum())
        count += k
    return math.exp(nll / count), count


def test_perplexity_matches_transformers(smol, hf_smollm2):
    scorer, tokenizer = smol
    ids = tokenizer.encode(open(TEXT).read(), bos=True)
    assert len(ids) > 300
    ours = ev.perplexity(scorer, ids, window=128, stride=64)
    ref, count = _hf_perplexity(hf_smollm2, ids, 128, 64)
    assert ours["tokens"] == count == len(ids) - 1
    assert abs(ours["perplexity"] / ref - 1) < 0.005, (ours, ref)
    assert 1 < ref < 1000


def test_multiple_choice_matches_direct_loglik(smol, hf_smollm2):
    import torch

    scorer, tokenizer = smol
    records = ev.read_jsonl(MC, "error", ev.validate_mc)
    assert len(records) == 20
    result = ev.multiple_choice(scorer, tokenizer, records)
    correct = 0
    for rec, res in zip(records, result["results"], strict=False):
        # each choice's own sum of token log-probabilities under an independent model (transformers); the
        # choices of one question share a call (right-padded rows; causal attention keeps them exact)
        pairs = [ev.choice_tokens(tokenizer, rec["question"], c) for c in rec["choices"]]
        rows = [ctx + cont for ctx, cont in pairs]
        width = max(map(len, rows))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        with torch.no_grad():
            logits = hf_smollm2(ids, attention_mask=mask).logits.double()
            logp_all = torch.log_softmax(logits, -1)
            hf_logit_scale = logits.abs().max()
        direct = []
        for j, (r, (_, cont)) in enumerate(zip(rows, pairs, strict=False)):
            positions = range(len(r) - len(cont) - 1, len(r) - 1)  # logits at t predict token t + 1
            direct.append(sum(float(logp_all[j, t, r[t + 1]]) for t in positions))
        # each token's log-probability carries twice the logits' float32 rounding (SmolLM2: D 576, L 30)
        tol = 2 * relative_tolerance(576, 30) * float(hf_logit_scale) * max(len(c) for _, c in pairs)
        np.testing.assert_allclose(res["scores"], direct, rtol=0, atol=tol)
        top = np.sort(direct)[-2:]
        assert res["pred"] == int(np.argmax(direct)) or top[1] - top[0] <= 2 * tol, "not the best and not a tie"
        correct += int(np.argmax(direct)) == rec["answer"]
    assert result["accuracy"] == correct / 20
    # the file is built so that the right answer is the likely continuation: a working scorer gets most right
    assert result["accuracy"] >= 0.8


def test_validate_mc_answer_forms():
    rec = {"question": "q", "choices": ["a", "b", "c"]}
    assert ev.validate_mc({**rec, "answer": 2})["answer"] == 2
    assert ev.validate_mc({**rec, "answer": "B"})["answer"] == 1
    assert ev.validate_mc({**rec, "answer": "c"})["answer"] == 2
    for bad in [
        {**rec, "answer": 3},
        {**rec, "answer": True},
        {"question": "q", "choices": ["a"], "answer": 0},
        {"choices": ["a", "b"], "answer": 0},
        [1, 2],
    ]:
        with pytest.raises(ValueError):
            ev.validate_mc(bad)


def test_cli_bad_lines_skip_or_refuse(tmp_path, smollm2_checkpoint):
    path = tmp_path / "mc.jsonl"
    lines = open(MC).read().splitlines()[:3]
    lines.insert(1, "{not json")
    lines.insert(3, json.dumps({"question": "x", "choices": ["a", "b"], "answer": 7}))
    path.write_text("\n".join(lines) + "\n")
    refused = run_cli("experiments.eval", f"--mc={path}", "--on_bad_line=error", f"--checkpoint={smollm2_checkpoint}")
    assert refused.returncode == 1 and f"{path}:2: not valid JSON" in refused.stderr, refused.stderr
    skipped = run_cli(
        "experiments.eval", f"--mc={path}", "--json", "--on_bad_line=skip", f"--checkpoint={smollm2_checkpoint}"
    )
    assert skipped.returncode == 0, skipped.stderr
    assert f"{path}:2:" in skipped.stderr and f"{path}:4:" in skipped.stderr
    out = json.loads(skipped.stdout.strip().splitlines()[-1])
    assert out["mc"]["n"] == 3
    bad_flag = run_cli("experiments.eval", f"--text={path}", "--window=8", "--stride=9")
    assert bad_flag.returncode == 1 and "--stride" in bad_flag.stderr
