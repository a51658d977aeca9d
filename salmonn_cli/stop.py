"""SIGTERM is Ctrl-C: what `timeout`, systemd or a container stop sends gets the same careful stop.

The handler raises KeyboardInterrupt, so every command's Ctrl-C path runs unchanged (work in flight finished or
dropped, files written whole, the summary printed); it also notes that the stop was a SIGTERM, so the process
exits 143 (128 + SIGTERM) where Ctrl-C exits 130.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from .errors import EXIT_INTERRUPTED, EXIT_TERMINATED

_terminated = threading.Event()


def note_terminated() -> None:
    """Record that the stop under way was asked for by SIGTERM (for the exit code)."""
    _terminated.set()


def interrupted_exit() -> tuple[int, str]:
    """(exit code, the word for the stop line) of a run stopped by a signal."""
    return (EXIT_TERMINATED, "terminated") if _terminated.is_set() else (EXIT_INTERRUPTED, "interrupted")


def _raise_interrupt(signum, frame) -> None:
    note_terminated()
    raise KeyboardInterrupt


def sigterm_as_interrupt() -> None:
    """From now on SIGTERM stops this process as Ctrl-C does (main thread only: that is where signals land)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupt)


@contextlib.contextmanager
def stop_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM through a short step that must not be cut in two (a result's file and its line in
    results.jsonl); a stop asked for meanwhile takes effect right after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}  # fmt: skip
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    wanted = [sig for sig in pending if previous[sig] is not signal.SIG_IGN]
    if wanted:
        if signal.SIGTERM in wanted:
            note_terminated()
        raise KeyboardInterrupt
