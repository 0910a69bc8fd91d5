"""Logging defaults for the command-line programs."""

from __future__ import annotations

import sys

from absl import logging


def quiet_unless_verbose(argv=None) -> None:
    """Sets absl logging to WARNING unless ``--verbosity``/``-v`` was given.

    absl's ``app.run`` raises the default verbosity to INFO, at which Orbax and XLA log every checkpoint restore and
    backend probe; call this first thing in ``main``.
    """
    argv = sys.argv[1:] if argv is None else argv
    if not any(a.split("=")[0] in ("--verbosity", "-v", "--v") for a in argv):
        logging.set_verbosity(logging.WARNING)
