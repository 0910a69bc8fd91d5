"""Logging and help defaults for the command-line programs (and quiet Orbax calls in the library)."""

from __future__ import annotations

import contextlib
import logging as _std_logging
import sys

from absl import logging

# Orbax's note when it writes a checkpoint without OCDBT (our layout, on purpose: see llama_jax/checkpoint.py).
_ORBAX_NOISE = ("Skipping merge of OCDBT checkpoints",)


class _DropMessages(_std_logging.Filter):
    def __init__(self, fragments):
        super().__init__()
        self.fragments = tuple(fragments)

    def filter(self, record: _std_logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is not ours to judge
            return True
        return not any(f in msg for f in self.fragments)


def verbosity_given(argv=None) -> bool:
    """Whether ``--verbosity``/``-v`` is on the command line."""
    argv = sys.argv[1:] if argv is None else argv
    return any(a.split("=")[0] in ("--verbosity", "-v", "--v") for a in argv)


def quiet_unless_verbose(argv=None) -> None:
    """Sets absl logging to WARNING unless ``--verbosity``/``-v`` was given.

    absl's ``app.run`` raises the default verbosity to INFO, at which Orbax and XLA log every checkpoint restore and
    backend probe (JAX's "Unable to initialize backend 'tpu'"); call this first thing in ``main``.
    """
    if not verbosity_given(argv):
        logging.set_verbosity(logging.WARNING)


@contextlib.contextmanager
def quiet_orbax():
    """Inside the block, Orbax's notes about its own internals (the OCDBT merge it skips because llama-jax writes
    without OCDBT) are dropped from the ``absl`` logger; every other warning passes. Used around Orbax saves."""
    drop = _DropMessages(_ORBAX_NOISE)
    loggers = [logging.get_absl_logger(), _std_logging.getLogger()]
    for lg in loggers:
        lg.addFilter(drop)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(drop)


def adopt_main_help(doc: str | None, module_name: str, fv=None) -> None:
    """Makes ``--help`` of a console script print ``doc`` and the flags defined by ``module_name``, as
    ``python -m module`` does. absl's help shows the docstring of ``__main__`` and the flags of the file named by
    ``sys.argv[0]``; a console script's ``__main__`` is a generated wrapper with neither. Call after defining flags.
    """
    from absl import flags

    fv = flags.FLAGS if fv is None else fv
    main = sys.modules.get("__main__")
    if main is not None and not main.__doc__ and doc:
        main.__doc__ = doc
    if sys.argv and sys.argv[0] != module_name:
        for flag in fv.get_flags_for_module(module_name):
            fv.register_flag_by_module(sys.argv[0], flag)


_HELD_STDERR: list[int] = []  # the real stderr while stderr_held() is active (innermost last)


@contextlib.contextmanager
def stderr_held():
    """Sends file descriptor 2 to a temporary file for the block and replays what was written there when the block
    ends, so a clean failure can be reported by :func:`exit_now` without the noise of Orbax/TensorStore reader
    threads that fail in the background after a damaged array (they write "Event loop is closed" tracebacks).
    """
    import os
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    held = tempfile.TemporaryFile()
    os.dup2(held.fileno(), 2)
    _HELD_STDERR.append(saved)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        _HELD_STDERR.pop()
        os.close(saved)
        held.seek(0)
        data = held.read()
        held.close()
        if data:
            os.write(2, data)


def exit_now(message: str, code: int) -> None:
    """Prints ``message`` to the real stderr and ends the process at once with exit status ``code``.

    For a damaged checkpoint found while Orbax/TensorStore reads it: their reads still in flight fail in
    background threads once the event loop is gone and print "Event loop is closed" tracebacks. Called inside
    :func:`stderr_held`, those go to the discarded temporary file; the process leaves with ``os._exit`` (no
    interpreter shutdown, which would wait for or re-raise in those threads) with stderr closed after the message.
    """
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    os.write(_HELD_STDERR[0] if _HELD_STDERR else 2, (message + "\n").encode())
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os._exit(code)
