"""Command lines a newcomer meets: quiet terminals by default (no absl/Orbax INFO or WARNING lines, no libtpu probe,
no OCDBT note), full ``--help`` from the console scripts, clean errors, help examples that exist, one
``--on_bad_line`` default, outputs with the user's umask."""

import os
import re
import shutil
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# absl's own format (I1201 09:29:14.095552 ... file.py:849] ...) and Python logging's (WARNING:absl:...)
LOG_LINE = re.compile(
    r"^(?:[IWEF]\d{4} \d\d:\d\d:\d\d|(?:INFO|WARNING|ERROR):[\w.]+:)|OCDBT|Unable to initialize "
    r"backend",
    re.M,
)


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="")
    env.pop("JAX_PLATFORMS")
    env.update(extra)
    return env


def _run(args, cwd=ROOT, timeout=600, **kw):
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_env(), **kw)


def _log_lines(text):
    return [line for line in text.splitlines() if LOG_LINE.search(line)]


@pytest.fixture(scope="module")
def tiny_checkpoint(smollm2_checkpoint, tmp_path_factory):
    """A tiny random Llama with SmolLM2's real tokenizer (vocabulary 49152): CLI runs in seconds."""
    import jax.numpy as jnp
    from flax import nnx

    import llama_jax
    from llama_jax import checkpoint
    from llama_jax.config import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=49152,
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
        hidden_dim=64,
        max_seq_len=256,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    )
    path = str(tmp_path_factory.mktemp("tiny") / "ckpt")
    llama_jax.save(
        path,
        llama_jax.Llama(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.float32),
        tokenizer_files=[checkpoint.tokenizer_dir(smollm2_checkpoint)],
    )
    return path


def test_finetune_stderr_has_no_log_lines(tiny_checkpoint, tmp_path):
    work = tmp_path / "ft"
    proc = _run(
        [
            sys.executable,
            "experiments/finetune.py",
            f"--checkpoint={tiny_checkpoint}",
            f"--workdir={work}",
            "--steps=2",
            "--seq_len=32",
            "--batch_size=2",
            "--save_every=1",
            "--warmup=0",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _log_lines(proc.stderr) == [], _log_lines(proc.stderr)[:5]
    assert "held-out perplexity after" in proc.stdout and (work / "final" / "config.json").exists()
    mask = os.umask(0o022)
    os.umask(mask)
    for p in (work, work / "final", work / "final" / "config.json"):
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        assert stat.S_IMODE(p.stat().st_mode) == want, p
    verbose = _run(
        [
            sys.executable,
            "experiments/finetune.py",
            f"--checkpoint={tiny_checkpoint}",
            f"--workdir={work}",
            "--steps=2",
            "--seq_len=32",
            "--batch_size=2",
            "--verbosity=0",
        ]
    )
    assert verbose.returncode == 0 and _log_lines(verbose.stderr), "--verbosity=0 should show INFO lines"


def test_plan_stderr_has_no_log_lines():
    proc = _run(
        [
            sys.executable,
            "-m",
            "llama_jax.plan",
            "--model=llama3.2-1b",
            "--mesh=tensor=1",
            "--max_length=128",
            "--prefill_length=16",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _log_lines(proc.stderr) == [], _log_lines(proc.stderr)[:5]


SAVE = r"""
import sys
import jax.numpy as jnp
from flax import nnx
import llama_jax
from llama_jax import quant
from llama_jax.config import LlamaConfig
cfg = LlamaConfig(vocab_size=256, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64,
                  max_seq_len=64, rope_theta=10000.0)
path = llama_jax.save(sys.argv[1] + "/f32", llama_jax.Llama(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.float32))
quant.save(sys.argv[1] + "/int8", quant.load(path, quant="int8"))
llama_jax.load(sys.argv[1] + "/int8")
"""


def test_save_and_quant_save_print_nothing(tmp_path):
    proc = _run([sys.executable, "-c", SAVE, str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _log_lines(proc.stderr) == [] and "OCDBT" not in proc.stderr, proc.stderr[-2000:]
    assert (tmp_path / "int8" / "quant.json").exists()


def _console(name, module):
    """The installed console script, else the same entry point run the way its generated wrapper runs it."""
    exe = shutil.which(name)
    if exe:
        return [exe]
    return [sys.executable, "-c", f"import sys; sys.argv[0] = {name!r}; from {module} import run; sys.exit(run())"]


@pytest.mark.parametrize(
    "name,module,flag",
    [
        ("llama-jax-convert", "conversions.__main__", "--source"),
        ("llama-jax-generate", "llama_jax.generate", "--max_new_tokens"),
    ],
)
def test_console_scripts_print_full_help(name, module, flag):
    proc = _run(_console(name, module) + ["--help"])  # absl's --help exits with status 1
    assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr, proc.stderr
    assert flag in proc.stdout and "python -m" in proc.stdout, proc.stdout[:500]
    assert "Try --helpfull" not in proc.stdout.split("flags:")[0]


def test_finetune_missing_checkpoint_is_a_clean_error(tmp_path):
    proc = _run([sys.executable, "experiments/finetune.py", "--checkpoint=/nonexistent", f"--workdir={tmp_path}/w"])
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "error: --checkpoint: /nonexistent" in proc.stderr, proc.stderr
    assert not (tmp_path / "w").exists()


def test_eval_help_examples_exist_and_on_bad_line_defaults_agree():
    ev = _run([sys.executable, "experiments/eval.py", "--help"])
    gen = _run([sys.executable, "-m", "llama_jax.generate", "--help"])
    files = re.findall(r"--(?:text|mc)=(\S+\.(?:txt|jsonl))", ev.stdout)
    assert files and all(os.path.isfile(os.path.join(ROOT, f)) for f in files), files
    defaults = [
        re.search(r"--on_bad_line: <[^>]*>:.*?\(default: '(\w+)'\)", p.stdout, re.S).group(1) for p in (ev, gen)
    ]
    assert defaults == ["error", "error"]
