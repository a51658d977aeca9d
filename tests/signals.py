"""Signals for the tests that interrupt a real `salmonn` process."""

from __future__ import annotations

import signal


def default_sigint() -> None:
    """`preexec_fn` for a child that must react to SIGINT as under a terminal.

    A shell starts background jobs with SIGINT ignored, children inherit that, and Python then installs no
    KeyboardInterrupt handler: the Ctrl-C tests would see the process finish normally instead.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
