"""The README runs as written: every ```python block (each in a fresh process, from a directory laid out like the
repository root, after the README's own conversion command has made ``ckpt/``), and every README shell command
that finishes in under a minute, in README order. Commands that need downloads, install packages or take minutes
are listed in SLOW_OR_EXTERNAL with the reason (and the test that covers them)."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")

# substring of a command -> why it is not run here
SLOW_OR_EXTERNAL = {
    "pip install": "installs packages (CI installs them before the tests)",
    "bash .ci/run": "the whole test suite",
    "--source=meta": "needs Meta's downloaded Llama 3.1 8B files",
    "--target=meta --input=ckpt_8b/": "needs Meta's downloaded Llama 3.1 8B files",
    "experiments/finetune.py": "minutes on a CPU (tests/test_cli_quiet.py runs finetune.py on a tiny model)",
    "llama_jax.plan --model=llama3.1-405b": "compiles 405B ahead of time (about a minute; tests/test_plan.py)",
    "--prompts_file=in.jsonl": "needs your in.jsonl (tests/test_batch_generate.py runs it)",
    "--text=tests/data/eval_text.txt": "a minute or more of perplexity windows (tests/test_eval.py)",
}


def readme_blocks():
    """(python blocks, shell commands) of README.md in order; shell commands are the indented lines of plain
    indented blocks (continuations joined) that start with a program name, with any ``&&`` chain split."""
    text = open(README, encoding="utf-8").read()
    python = re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)
    outside = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    commands = []
    for block in re.findall(r"(?:^\n)((?:^    .*\S.*\n)+)", outside, re.M):
        joined = re.sub(r"\\\n\s*", "", block)
        for line in joined.splitlines():
            line = line.strip()
            if re.match(r"(python|llama-jax-|bash|pip|/usr/bin/time)\b", line):
                commands.extend(part.strip() for part in line.split(" && "))
    return python, commands


PYTHON_BLOCKS, COMMANDS = readme_blocks()


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)  # the sharding block sets its own
    return env


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, smollm2_checkpoint):
    """A directory laid out like the repository root (experiments/, tests/ linked) where the README's conversion
    command has written ckpt/."""
    d = tmp_path_factory.mktemp("readme")
    for name in ("experiments", "tests"):
        os.symlink(os.path.join(ROOT, name), d / name)
    convert = [c for c in COMMANDS if "--source=gguf" in c and "--output=ckpt/" in c]
    assert len(convert) == 1, COMMANDS
    proc = subprocess.run(
        ["bash", "-c", convert[0] + " --progress=false"], cwd=d, env=_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (d / "ckpt" / "config.json").exists()
    return d


def test_readme_has_blocks():
    assert len(PYTHON_BLOCKS) >= 8 and any("XLA_FLAGS" in b for b in PYTHON_BLOCKS)
    assert any(c.startswith("python -m llama_jax.generate --chat") for c in COMMANDS)


SERVER = "127.0.0.1:8000"  # where the README's serving examples expect `python -m llama_jax.serve`


@pytest.fixture(scope="module")
def readme_server(workdir):
    """The README's `python -m llama_jax.serve` (default model), on a free loopback port instead of 8000."""
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(workdir / f"serve_{port}.log", "w+")
    cmd = [sys.executable, "-m", "llama_jax.serve", f"--port={port}", "--max_batch=2", "--max_length=512"]
    proc = subprocess.Popen(cmd, cwd=workdir, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 900
        while True:
            assert proc.poll() is None, f"server exited {proc.returncode}: {open(log.name).read()[-3000:]}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "server did not come up"
            time.sleep(1)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_serving_curl_example_answers(readme_server):
    text = open(README, encoding="utf-8").read()
    (bash,) = [b for b in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M) if "curl" in b and SERVER in b]
    curl = re.sub(r"\\\n\s*", " ", bash[bash.index("curl") :]).replace(SERVER, readme_server)
    proc = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in json.loads(proc.stdout)["choices"][0]["message"]["content"], proc.stdout


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_block_runs_as_written(index, workdir, request):
    code = PYTHON_BLOCKS[index]
    if SERVER in code:  # the serving examples talk to the README's server
        code = code.replace(SERVER, request.getfixturevalue("readme_server"))
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=workdir, env=_env(), capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, f"README python block {index}:\n{code}\n{proc.stderr[-4000:]}"
    assert "WARNING:absl" not in proc.stderr and "OCDBT" not in proc.stderr, proc.stderr[-2000:]


def _runnable(command):
    reasons = [why for key, why in SLOW_OR_EXTERNAL.items() if key in command]
    return not reasons


def test_shell_commands_run(workdir):
    ran = []
    for command in COMMANDS:
        if not _runnable(command):
            continue
        if command.startswith("llama-jax-") and shutil.which(command.split()[0]) is None:
            command = command.replace("llama-jax-convert", f"{sys.executable} -m conversions", 1)
        if "--source=gguf" in command and "--output=ckpt/" in command:
            continue  # ran by the workdir fixture
        if command.startswith("python "):
            command = sys.executable + command[len("python") :]
        t0 = time.time()
        proc = subprocess.run(
            ["bash", "-c", command], cwd=workdir, env=_env(), capture_output=True, text=True, timeout=600
        )
        ran.append((command, round(time.time() - t0, 1)))
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr
    print("\n".join(f"{s:6.1f}s  {c}" for c, s in ran))
    assert len(ran) >= 5, ran
    assert (workdir / "hf_out" / "tokenizer_config.json").exists()
    assert (workdir / "ckpt_from_hf" / "config.json").exists()
