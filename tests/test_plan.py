"""The memory planner (python -m llama_jax.plan): 405B in minutes, parameter bytes vs arithmetic, bad input."""

import json
import os
import subprocess
import sys

import pytest

from llama_jax.config import get_preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_plan(tmp_path, *flags, timeout=300):
    out = tmp_path / "plan.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)          # the planner asks for its own fake CPU devices
    proc = subprocess.run([sys.executable, "-m", "llama_jax.plan", *flags, f"--json_out={out}"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


@pytest.mark.parametrize("quant,bytes_per_param", [("none", 2), ("int8", 1)])
def test_405b_plan_parameter_bytes_match_arithmetic(tmp_path, quant, bytes_per_param):
    proc, report = run_plan(tmp_path, "--model=llama3.1-405b", "--mesh=tensor=8", "--dtype=bfloat16",
                            f"--quant={quant}", "--batch=1", "--max_length=131072")
    assert proc.returncode == 0, proc.stderr[-4000:]
    config = get_preset("llama3.1-405b")
    expected = config.num_params() * bytes_per_param / 8
    names = [p["name"].split()[0] for p in report["programs"]]
    assert names == ["prefill", "decode"]
    for p in report["programs"]:
        assert abs(p["params"] - expected) / expected < 0.01, (p, expected)
        # KV cache: k and v [L, B, S, K/8, H] in bf16 (8 KV heads over tensor=8), plus lengths.
        kv = 2 * config.n_layers * 1 * 131072 * (config.n_kv_heads // 8) * config.head_dim * 2
        assert kv <= p["cache"] <= kv + 64
        assert p["temp"] > 0
        assert p["total"] == p["params"] + p["cache"] + p["optimizer"] + p["temp"] + p["other_outputs"]
    assert "does NOT fit" in proc.stdout and "H200 (141 GB)" in proc.stdout


def test_train_step_plan_counts_adamw_state(tmp_path):
    proc, report = run_plan(tmp_path, "--model=llama3.1-8b", "--mesh=fsdp=8", "--max_length=2048",
                            "--prefill_length=128", "--train", "--train_length=256")
    assert proc.returncode == 0, proc.stderr[-4000:]
    train = report["programs"][-1]
    assert train["name"].startswith("train step")
    assert abs(train["params"] - get_preset("llama3.1-8b").num_params() * 2 / 8) / train["params"] < 0.01
    # AdamW keeps two moments per parameter in the parameter dtype (plus a step count).
    assert abs(train["optimizer"] - 2 * train["params"]) / train["optimizer"] < 0.001
    assert train["temp"] > 0


@pytest.mark.parametrize("flags,culprit", [
    (["--model=llama3.1-405b", "--mesh=tensor=3"], "'tensor'"),           # 3 divides neither heads nor vocab
    (["--model=llama3.1-8b", "--mesh=tensor=2,model=2"], "'model'"),
    (["--model=llama3.1-999b"], "llama3.1-999b"),
    (["--model=llama3.1-8b", "--mesh=tensor=1", "--max_length=0"], "--max_length"),
    (["--model=llama3.1-8b", "--mesh=tensor=1", "--quant=int8", "--train"], "--train"),
    (["--model=llama3.1-8b", "--quant=int4"], "quant"),
])
def test_bad_input_exits_nonzero_naming_the_culprit(tmp_path, flags, culprit):
    proc, report = run_plan(tmp_path, *flags, timeout=120)
    assert proc.returncode != 0
    assert culprit in proc.stderr, proc.stderr[-2000:]
    assert report is None and not list(tmp_path.iterdir())      # nothing written
