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
