"""Issue 3: the persistent XLA compilation cache is on by default, so a second run compiles nothing new."""

import os
import subprocess
import sys

SCRIPT = """
import jax, numpy as np
from flax import nnx
from llama_jax.engine import Engine
from llama_jax.model import Llama
from tests.reference import tiny_config
hits = []
jax.monitoring.register_event_listener(lambda name, **kw: hits.append(name) if "cache_hits" in name else None)
engine = Engine(Llama(tiny_config(max_seq_len=128), rngs=nnx.Rngs(0)))
print(engine.generate([[1, 2, 3]], max_new_tokens=4)[0].tokens)
print("HITS", len(hits))
"""


def _run(cache_dir):
    env = {**os.environ, "LLAMA_JAX_COMPILATION_CACHE": str(cache_dir)}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    return lines[0], int(lines[-1].split()[1]), sorted(os.listdir(cache_dir))


def test_second_run_reuses_compiled_programs(tmp_path):
    cache = tmp_path / "xla"
    tokens1, hits1, entries1 = _run(cache)
    assert entries1, "the first run wrote no compiled programs"
    tokens2, hits2, entries2 = _run(cache)
    assert tokens2 == tokens1
    assert entries2 == entries1, "the second run compiled programs the first had not cached"
    # every program of run 2 comes from the cache; run 1 hits only programs it compiled twice itself (two jit
    # wrappers of the same computation), since every program is cached however fast it compiled
    programs = len([e for e in entries1 if not e.endswith("-atime")])
    assert hits2 >= programs > hits1
