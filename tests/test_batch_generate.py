"""Batch generation with continuous refilling (Engine.generate_continuous, ``generate --output``).

64 chat prompts at batch 16 give every prompt the same greedy tokens as generating it alone (rows are refilled
as they finish: 48 inserts); the CLI job killed mid-way and restarted loses no prompt and repeats none, drops a
line cut short by the kill, and reports malformed input lines by line number.
"""

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO

MAX_NEW = 12
SUBJECTS = ["cats", "the moon", "rain", "bread", "music", "rivers", "winter", "bees"]


def _questions():
    qs = []
    for i in range(64):
        kind = i % 4
        if kind == 0:
            qs.append(f"What is {i} plus {i + 3}? Answer with a number only.")
        elif kind == 1:
            qs.append(f"Write one short sentence about {SUBJECTS[i % 8]}.")
        elif kind == 2:
            qs.append(f"Say the word '{SUBJECTS[i % 8].split()[-1]}' and nothing else.")
        else:
            qs.append(f"Name a color. Question {i}.")
    return qs


@pytest.fixture(scope="module")
def setup(smollm2_checkpoint):
    from llama_jax import checkpoint
    from llama_jax.engine import Engine
    from llama_jax.generate import encode_prompts
    from llama_jax.tokenizer import Tokenizer

    tok = Tokenizer.from_file(checkpoint.tokenizer_dir(smollm2_checkpoint))
    questions = _questions()
    ids = encode_prompts(questions, tok, chat=True, system=None, tools=None, date=None)
    engine = Engine(checkpoint.load(smollm2_checkpoint), max_length=256)
    alone = [engine.generate([p], max_new_tokens=MAX_NEW, tokenizer=tok)[0] for p in ids]
    return engine, tok, questions, ids, alone


def test_continuous_batch_equals_alone(setup):
    engine, tok, _, ids, alone = setup
    inserts = []
    real_insert = engine.insert

    def spy(ds, row, prompt, **kw):
        inserts.append(row)
        return real_insert(ds, row, prompt, **kw)

    engine.insert = spy
    try:
        got, order = {}, []
        t0 = time.perf_counter()
        for i, c in engine.generate_continuous(ids, batch_size=16, max_new_tokens=MAX_NEW, tokenizer=tok):
            assert i not in got
            got[i] = c
            order.append(i)
        elapsed = time.perf_counter() - t0
    finally:
        del engine.insert
    assert sorted(got) == list(range(64))
    assert len(inserts) == 64 - 16
    lengths = [len(a.tokens) for a in alone]
    assert min(lengths) < MAX_NEW, "no prompt stopped early: refilling not exercised"
    assert order != sorted(order)  # short answers finished (and were replaced) before long ones
    for i, a in enumerate(alone):
        assert got[i].tokens == a.tokens, (i, tok.decode(got[i].tokens), tok.decode(a.tokens))
        assert got[i].finish_reason == a.finish_reason and got[i].text == a.text
    n_tok = sum(len(c.tokens) for c in got.values())
    print(f"continuous batching: {n_tok} tokens, 64 prompts, batch 16: {n_tok / elapsed:.1f} tokens/s")


def test_cli_kill_resume_and_bad_lines(setup, smollm2_checkpoint, tmp_path):
    _, tok, questions, _, alone = setup
    n, max_new = 24, 6
    src = tmp_path / "in.jsonl"
    lines = [json.dumps({"prompt": q}) for q in questions[:n]]
    lines.insert(5, "{broken")  # line 6
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "llama_jax.generate",
        f"--checkpoint={smollm2_checkpoint}",
        f"--prompts_file={src}",
        f"--output={out}",
        "--chat",
        f"--max_new_tokens={max_new}",
        "--batch_size=4",
        "--max_length=256",
        "--steps_per_dispatch=1",
    ]
    refused = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and f"{src}:6: not valid JSON" in refused.stderr
    assert not out.exists()

    cmd.append("--on_bad_line=skip")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "finished before it could be killed: " + proc.stderr.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = out.read_text().count("\n")
    assert 3 <= first < n
    with open(out, "a") as f:
        f.write('{"id": "line:1", "prom')  # a record cut short by the kill
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert f"{src}:6:" in again.stderr and "incomplete last line" in again.stderr
    assert f"{first} of {n} prompts already done" in again.stderr
    assert "throughput:" in again.stderr and "tokens/s" in again.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == n
    by_line = {r["id"]: r for r in records}
    for k in range(n):
        number = k + 1 if k < 5 else k + 2  # the broken line 6 shifts later prompts by one
        r = by_line[f"line:{number}"]
        assert r["prompt"] == questions[k]
        expect = alone[k].tokens[:max_new]
        assert r["tokens"] == expect, (k, r["text"], tok.decode(expect))
