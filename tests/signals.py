"""Signals for the tests that interrupt a real `salmonn` process."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator


def default_sigint() -> None:
    """`preexec_fn` for a child that must react to SIGINT as under a terminal.

    A shell starts background jobs with SIGINT ignored, children inherit that, and Python then installs no
    KeyboardInterrupt handler: the Ctrl-C tests would see the process finish normally instead.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def terminal_sigint() -> Iterator[None]:
    """SIGINT in this (the test's own) process as under a terminal, for the duration: Python's KeyboardInterrupt.

    For the same reason as above, a test process started in the background has SIGINT ignored, and a test of
    what a Ctrl-C does in-process would see nothing happen."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
