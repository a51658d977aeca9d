"""The live pipeline: capture and segmentation on the calling thread, the model on a worker thread.

    source.read() -> on_audio (--save-audio) -> segmenter.feed() -> segment queue -> worker: answer -> on_result

The segment queue is bounded. With a live source a full queue drops its OLDEST segment (the newest audio is
what the listener is waiting for) and says so; with a `--fast` file it waits instead, so nothing is dropped.
Every segment the segmenter cuts is counted exactly once: captured = processed + skipped (silent) + dropped +
abandoned (Ctrl-C without --drain) + failed. Ctrl-C stops capture; then the queue and the segment in flight are
either finished (`drain`) or abandoned, and the summary says which.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..audio import SAMPLE_RATE, is_silent
from ..errors import SalmonnError
from .segmenter import LiveSegment

_POLL_S = 0.1  # how long the capture loop waits for a block before checking on the worker
_STATUS_EVERY_S = 0.25


@dataclass(frozen=True)
class LiveConfig:
    """How the loop behaves (what is asked of each segment is the `answer` callable's business)."""

    max_queue: int = 4  # segments waiting for the model; beyond this the oldest is dropped (live sources)
    drain: bool = False  # on Ctrl-C, finish the queue and the segment in flight instead of abandoning them
    force: bool = False  # answer silent segments too


@dataclass(frozen=True)
class LiveResult:
    """The answer about one segment: times since capture start, text, latency (result time - capture time of
    the segment's end) and the model's compute time."""

    index: int
    start: float
    end: float
    text: str
    latency_s: float
    compute_s: float
    heard_s: float  # seconds of audio the model heard (the segment with its padding)

    @property
    def rtf(self) -> float:
        """Real-time factor of this segment: compute time / audio time (> 1: slower than real time)."""
        return self.compute_s / max(self.heard_s, 1e-9)


@dataclass(frozen=True)
class LiveSummary:
    """Counts and timings of a live session (also used as a running status)."""

    captured: int = 0  # segments cut
    processed: int = 0
    skipped: int = 0  # silent: the model was not run
    dropped: int = 0  # evicted from a full queue
    abandoned: int = 0  # queued or in flight at Ctrl-C without --drain
    failed: int = 0
    queued: int = 0
    audio_s: float = 0.0  # seconds of audio captured
    capture_s: float = 0.0  # wall time from capture start to the last block
    overflow_s: float = 0.0  # audio lost before segmentation (capture buffer full)
    compute_s: float = 0.0
    heard_s: float = 0.0
    latencies: tuple[float, ...] = ()
    interrupted: bool = False

    @property
    def rtf(self) -> float | None:
        return self.compute_s / self.heard_s if self.heard_s else None

    @property
    def latency_median_s(self) -> float | None:
        return statistics.median(self.latencies) if self.latencies else None

    def balanced(self) -> bool:
        """Every captured segment accounted for exactly once."""
        done = self.processed + self.skipped + self.dropped + self.abandoned + self.failed
        return self.captured == done + self.queued

    def line(self) -> str:
        """One human sentence: the counts (which add up), real-time factor, median latency."""
        plural = "" if self.captured == 1 else "s"
        parts = [f"{self.captured} segment{plural} captured: {self.processed} answered", f"{self.skipped} silent",
                 f"{self.dropped} dropped", f"{self.abandoned} abandoned"]  # fmt: skip
        if self.failed:
            parts.append(f"{self.failed} failed")
        text = ", ".join(parts) + f"; {self.audio_s:.1f} s of audio"
        if self.rtf is not None:
            text += f", real-time factor {self.rtf:.2f}"
        if self.latency_median_s is not None:
            text += f", median latency {self.latency_median_s:.2f} s"
        if self.overflow_s:
            text += f"; {self.overflow_s:.1f} s of audio lost to a full capture buffer"
        return text

    def as_dict(self) -> dict:
        """The JSON summary record's fields."""
        keys = ("captured", "processed", "skipped", "dropped", "abandoned", "failed", "audio_s", "capture_s",
                "overflow_s", "compute_s", "interrupted")  # fmt: skip
        out = {k: round(v, 3) if isinstance(v, float) else v for k, v in ((k, getattr(self, k)) for k in keys)}
        out["rtf"] = None if self.rtf is None else round(self.rtf, 3)
        out["latency_median_s"] = None if self.latency_median_s is None else round(self.latency_median_s, 3)
        return out


@dataclass(frozen=True)
class LiveHooks:
    """Where the loop reports. `on_result` and `on_warning` may be called from the worker thread (never
    concurrently, and never after `run_live` returns); the others only from the calling thread."""

    on_result: Callable[[LiveResult], None]
    on_warning: Callable[[str], None] = lambda message: None
    on_audio: Callable[[np.ndarray], None] = lambda samples: None
    on_status: Callable[[LiveSummary], None] = lambda status: None
    on_start: Callable[[], None] = lambda: None  # capture has started: from now on every sample is heard


@dataclass
class _Counts:
    processed: int = 0
    skipped: int = 0
    dropped: int = 0
    abandoned: int = 0
    failed: int = 0
    captured: int = 0
    compute_s: float = 0.0
    heard_s: float = 0.0
    latencies: list[float] = field(default_factory=list)


class _Worker:
    """The model's thread and the bounded segment queue in front of it; one lock guards both and the counts,
    so a segment is counted once whatever Ctrl-C interrupts."""

    def __init__(self, answer: Callable[[np.ndarray], str], config: LiveConfig, hooks: LiveHooks, *, drop: bool):
        self._answer, self._config, self._hooks, self._drop = answer, config, hooks, drop
        self._cond = threading.Condition()
        self._queue: deque[LiveSegment] = deque()
        self._no_more = False  # capture is over: leave when the queue is empty
        self._abandoned = False  # results are no longer wanted
        self._in_flight = False
        self.counts = _Counts()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="salmonn-live-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, segment: LiveSegment) -> None:
        with self._cond:
            self.counts.captured += 1
            while len(self._queue) >= self._config.max_queue and not self._drop and not self._abandoned:
                self._cond.wait(_POLL_S)  # --fast: back-pressure instead of loss
            if len(self._queue) >= self._config.max_queue:
                old = self._queue.popleft()
                self.counts.dropped += 1
                self._hooks.on_warning(
                    f"the model is slower than real time: dropped the oldest waiting segment "
                    f"({old.start:.1f}-{old.end:.1f} s; {self.counts.dropped} dropped so far)"
                )
            self._queue.append(segment)
            self._cond.notify_all()

    def _take(self) -> LiveSegment | None:
        with self._cond:
            while not self._queue and not self._no_more and not self._abandoned:
                self._cond.wait()
            if self._abandoned or not self._queue:
                return None
            self._in_flight = True
            self._cond.notify_all()
            return self._queue.popleft()

    def _run(self) -> None:
        try:
            while (segment := self._take()) is not None:
                self._process(segment)
        except BaseException as exc:  # a bug, not a user error: the capture loop re-raises it
            with self._cond:
                self.error, self._abandoned = exc, True

    def _process(self, segment: LiveSegment) -> None:
        heard = segment.audio.shape[0] / SAMPLE_RATE
        if not self._config.force and is_silent(segment.audio):
            outcome, text = "skipped", ""
        else:
            started = time.perf_counter()
            try:
                outcome, text = "processed", self._answer(segment.audio).strip()
            except SalmonnError as exc:
                outcome, text = "failed", str(exc)
            compute = time.perf_counter() - started
        with self._cond:
            self._in_flight = False
            self._cond.notify_all()
            if self._abandoned:  # Ctrl-C came while the model ran: already counted as abandoned
                return
            c = self.counts
            setattr(c, outcome, getattr(c, outcome) + 1)
            if outcome == "failed":
                self._hooks.on_warning(f"segment {segment.start:.1f}-{segment.end:.1f} s failed: {text}")
            elif outcome == "processed":
                latency = time.monotonic() - segment.captured_at
                c.compute_s, c.heard_s = c.compute_s + compute, c.heard_s + heard
                c.latencies.append(latency)
                self._hooks.on_result(
                    LiveResult(segment.index, segment.start, segment.end, text, latency, compute, heard)
                )

    def finish(self) -> None:
        """No more segments: answer what is queued, then return (Ctrl-C here propagates)."""
        with self._cond:
            self._no_more = True
            self._cond.notify_all()
        while self._thread.is_alive():
            self._thread.join(_POLL_S)

    def abandon(self) -> None:
        """Give up on the queue and the segment in flight (its result is discarded when it comes)."""
        with self._cond:
            if not self._abandoned:
                self._abandoned = True
                self.counts.abandoned += len(self._queue) + int(self._in_flight)
                self._queue.clear()
            self._cond.notify_all()

    def snapshot(self, **fields_) -> LiveSummary:
        with self._cond:
            c = self.counts
            queued = 0 if self._abandoned else len(self._queue) + int(self._in_flight)  # abandoned: counted
            return LiveSummary(c.captured, c.processed, c.skipped, c.dropped, c.abandoned, c.failed, queued,
                               compute_s=c.compute_s, heard_s=c.heard_s,
                               latencies=tuple(c.latencies), **fields_)  # fmt: skip


class _Capture:
    """The calling thread's side: blocks -> audio hook -> segmenter -> worker, with overflow warnings."""

    def __init__(self, source, segmenter, worker: _Worker, hooks: LiveHooks) -> None:
        self.source, self.segmenter, self.worker, self.hooks = source, segmenter, worker, hooks
        self.samples = 0
        self.last_block_at: float | None = None
        self._warned_overflow = 0.0
        self._status_at = 0.0

    def run(self) -> None:
        """Until the source ends (a file), or forever (a microphone; Ctrl-C ends it)."""
        while True:
            if self.worker.error is not None:
                raise self.worker.error
            block = self.source.read(_POLL_S)
            if block is None:
                if self.source.ended:
                    break
            else:
                self._take(block)
            self._status()
        for segment in self.segmenter.flush():
            self.worker.put(segment)

    def _take(self, block) -> None:
        self.hooks.on_audio(block.samples)
        self.samples, self.last_block_at = block.end, block.captured_at
        if self.source.overflow_s > self._warned_overflow:
            self._warned_overflow = self.source.overflow_s
            self.hooks.on_warning(f"capture buffer full: {self.source.overflow_s:.1f} s of audio lost so far")
        for segment in self.segmenter.feed(block):
            self.worker.put(segment)

    def _status(self) -> None:
        now = time.monotonic()
        if now - self._status_at >= _STATUS_EVERY_S:
            self._status_at = now
            self.hooks.on_status(self.summary())

    def summary(self, interrupted: bool = False) -> LiveSummary:
        started = self.source.started_at
        capture_s = 0.0 if started is None or self.last_block_at is None else self.last_block_at - started
        return self.worker.snapshot(audio_s=self.samples / SAMPLE_RATE, capture_s=capture_s,
                                    overflow_s=self.source.overflow_s, interrupted=interrupted)  # fmt: skip


def run_live(source, segmenter, answer: Callable[[np.ndarray], str], config: LiveConfig,
             hooks: LiveHooks) -> LiveSummary:  # fmt: skip
    """Run the pipeline until the source ends or Ctrl-C; return the counts (which add up).

    `answer(audio)` gets each segment's 16 kHz audio and returns the text. After Ctrl-C the summary has
    `interrupted=True`; the caller exits 130 once it has closed its files.
    """
    worker = _Worker(answer, config, hooks, drop=source.live)
    capture = _Capture(source, segmenter, worker, hooks)
    worker.start()
    source.start()
    hooks.on_start()
    try:
        capture.run()
        worker.finish()
        return capture.summary()
    except KeyboardInterrupt:
        source.stop()  # capture ends here; what is already in the capture buffer may still be segmented
        _after_interrupt(capture, config.drain)
        return capture.summary(interrupted=True)
    finally:
        source.stop()
        worker.abandon()  # no-op after a finished run; stops a worker left behind by an error


def _after_interrupt(capture: _Capture, drain: bool) -> None:
    """Ctrl-C: with `drain`, segment the rest of the capture buffer and answer everything; a second Ctrl-C,
    or no `drain`, abandons what is left."""
    if not drain:
        capture.worker.abandon()
        return
    try:
        capture.run()  # the stopped source ends once its buffer is read
        capture.worker.finish()
    except KeyboardInterrupt:
        capture.worker.abandon()
