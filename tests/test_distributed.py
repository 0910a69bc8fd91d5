"""Multi-host: two processes on 127.0.0.1 (4 fake CPU devices each) vs one process; flag validation."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from llama_jax import distributed as D
from tests.conftest import keep_kernel_flags
from tests.numerics import assert_logits_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "workers", "multihost.py")
TIMEOUT = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    keep_kernel_flags(env)
    return env


def test_two_process_sharded_forward_equals_single_process(tmp_path):
    """Sharded-from-birth and checkpoint-restored models on a mesh spanning two processes give the logits of one
    process with one device."""
    ref_out, out, ckpt = tmp_path / "ref.npy", tmp_path / "multi.npy", tmp_path / "ckpt"
    ref = subprocess.run(
        [sys.executable, WORKER, "ref", str(ref_out), str(ckpt)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert ref.returncode == 0, ref.stderr[-3000:]
    for _attempt in range(3):  # a free port can be taken between our probe and the coordinator's bind
        port = free_port()
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    WORKER,
                    "worker",
                    str(out),
                    str(ckpt),
                    f"--coordinator_address=127.0.0.1:{port}",
                    "--num_processes=2",
                    f"--process_id={i}",
                ],
                cwd=ROOT,
                env=_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for i in range(2)
        ]
        try:
            logs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
        finally:
            for p in procs:  # bounded: never leave a worker waiting on its peer
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if not any(p.returncode and "ddress already in use" in log for p, log in zip(procs, logs, strict=False)):
            break
    for p, log in zip(procs, logs, strict=False):
        assert p.returncode == 0, log[-4000:]
    multi, single = np.load(out), np.load(ref_out)
    assert single.shape == (4, 8, 256) and multi.shape == (3, 4, 8, 256)
    # sharded reductions in another order: float32 rounding at the worker's D 64, L 2 (tests/numerics.py)
    assert_logits_close(multi[0], single, 64, 2, "init_sharded on two processes")
    assert_logits_close(multi[1], single, 64, 2, "checkpoint.load(mesh=...) on two processes")
    np.testing.assert_array_equal(multi[2], multi[1])  # saved by two processes, loaded again


@pytest.mark.parametrize(
    "args,culprit",
    [
        (("127.0.0.1:1234", None, 0), "--num_processes"),
        (("127.0.0.1", 2, 0), "--coordinator_address"),
        (("127.0.0.1:1234", 2, 2), "--process_id"),
        (("127.0.0.1:1234", 0, 0), "--num_processes"),
    ],
)
def test_bad_flags(args, culprit):
    with pytest.raises(ValueError, match=culprit):
        D.initialize(*args)


def test_single_process_is_a_no_op():
    assert D.initialize() is False
    assert D.initialize("127.0.0.1:1234", 1, 0) is False
