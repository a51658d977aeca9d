"""One inference thread and its bounded queue: the model runs one request at a time, first come first served.

The event loop stays free for /health, rejections and streams. A request whose client goes away sets its job's
stop flag: a queued job is then dropped unrun, a running one ends at its next decode step (`decode_watch`).
A full queue is answered at once with 503 and a Retry-After from the mean service time.
"""

from __future__ import annotations

import asyncio
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..decode_watch import DecodeStopped
from .api_error import SERVER_ERROR, ApiError

MAX_RETRY_AFTER_S = 120  # the openai SDK waits at most this long on a Retry-After


@dataclass
class Job:
    """One request's work: `run(stop)` in the worker thread, its result delivered to `future` on the loop."""

    run: Callable[[threading.Event], Any]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    stop: threading.Event = field(default_factory=threading.Event)

    def settle(self, result: Any = None, error: BaseException | None = None) -> None:
        def deliver() -> None:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        self.loop.call_soon_threadsafe(deliver)

    def abandon(self) -> None:
        """Its client went away: stop the work (dropped if queued, stopped at its next step if running); nobody
        will read what it ends with."""
        self.stop.set()
        self.future.add_done_callback(lambda future: future.cancelled() or future.exception())


@dataclass(frozen=True)
class WorkerStats:
    waiting: int
    busy: bool
    served: int
    cancelled: int
    max_in_flight: int


def shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down", type=SERVER_ERROR, code="server_shutting_down")


class InferenceWorker:
    """Runs jobs one at a time in its own thread; at most `capacity` wait behind the one running."""

    def __init__(self, capacity: int) -> None:
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=capacity)
        self._lock = threading.Lock()
        self._running: Job | None = None
        self._served = self._cancelled = self._in_flight = self._max_in_flight = 0
        self._service_s = 0.0
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="salmonn-inference", daemon=True)
        self._thread.start()

    def submit(self, run: Callable[[threading.Event], Any]) -> Job:
        """Queue `run`; a full queue (or a server shutting down) is an ApiError 503 now, not a wait."""
        loop = asyncio.get_running_loop()
        job = Job(run, loop.create_future(), loop)
        if self._closed:
            raise shutting_down()
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise ApiError(503, f"the server is busy: {self._jobs.maxsize} requests are waiting (--queue); retry "
                           "later", type=SERVER_ERROR, code="server_overloaded",
                           headers={"Retry-After": str(self._retry_after())}) from None  # fmt: skip
        return job

    def stats(self) -> WorkerStats:
        with self._lock:
            return WorkerStats(self._jobs.qsize(), self._running is not None, self._served, self._cancelled,
                               self._max_in_flight)  # fmt: skip

    @property
    def closed(self) -> bool:
        return self._closed

    def stop(self) -> None:
        """Stop taking work, at once (a signal handler calls it): queued jobs are answered 503, the running one
        is stopped at its next decode step."""
        self._closed = True
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.stop.set()
                job.settle(error=shutting_down())
        with self._lock:
            if self._running is not None:
                self._running.stop.set()

    def join(self, timeout_s: float) -> None:
        """After `stop`: let the thread finish the step it is in and end."""
        try:
            self._jobs.put_nowait(None)  # wakes the thread, which then ends
        except queue.Full:
            pass
        self._thread.join(timeout=timeout_s)

    def _retry_after(self) -> int:
        with self._lock:
            mean = self._service_s / self._served if self._served else 1.0
            ahead = self._jobs.qsize() + (self._running is not None)
        return max(1, min(MAX_RETRY_AFTER_S, math.ceil(mean * ahead)))

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            if job.stop.is_set():  # its client left while it waited
                self._count(cancelled=True)
                job.settle(error=DecodeStopped())
                continue
            with self._lock:
                self._running = job
                self._in_flight += 1
                self._max_in_flight = max(self._max_in_flight, self._in_flight)
            started = time.perf_counter()
            try:
                result = job.run(job.stop)
            except DecodeStopped as exc:
                self._count(cancelled=True)
                job.settle(error=exc)
            except BaseException as exc:  # delivered to the request, which answers it; the worker goes on
                job.settle(error=exc)
            else:
                self._count(seconds=time.perf_counter() - started)
                job.settle(result)
            finally:
                with self._lock:
                    self._running = None
                    self._in_flight -= 1

    def _count(self, *, cancelled: bool = False, seconds: float = 0.0) -> None:
        with self._lock:
            if cancelled:
                self._cancelled += 1
            else:
                self._served += 1
                self._service_s += seconds
