"""Watching a decode from outside: a stop flag and the ids of each step, for callers that serve many clients.

The decode loops (generate.py, beam.py) call `checkpoint()` once per step. Outside `watched_decoding` it does
nothing, so the command line and the parity tests decode exactly as before. Inside it, a set stop flag ends the
decode with `DecodeStopped` (a client that went away: its work ends within one step), and `on_step` sees the ids
each row just took (greedy and sampling; beam search has no settled ids until it ends). The watch lives in a
context variable, so it belongs to the thread that decodes, not to the model other threads may share.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass


class DecodeStopped(Exception):
    """The watcher's stop flag was set: the decode ended early and its output is dropped."""


@dataclass(frozen=True)
class DecodeWatch:
    """`stop`: set it to end the decode at its next step. `on_step`: called with each step's ids, one per row."""

    stop: threading.Event
    on_step: Callable[[Sequence[int]], None] | None = None


_WATCH: ContextVar[DecodeWatch | None] = ContextVar("salmonn_decode_watch", default=None)


@contextlib.contextmanager
def watched_decoding(watch: DecodeWatch) -> Iterator[None]:
    """Every decode in this thread, until the block ends, is watched by `watch`."""
    token = _WATCH.set(watch)
    try:
        yield
    finally:
        _WATCH.reset(token)


def stop_requested() -> bool:
    watch = _WATCH.get()
    return watch is not None and watch.stop.is_set()


def checkpoint(step_ids=None) -> None:
    """Called by the decode loops once per step (`step_ids`: a tensor of the ids just taken, or None)."""
    watch = _WATCH.get()
    if watch is None:
        return
    if watch.stop.is_set():
        raise DecodeStopped
    if watch.on_step is not None and step_ids is not None:
        watch.on_step(step_ids.tolist())
