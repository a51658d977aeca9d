"""Running a request's work on the inference worker: waiting for it while watching the client, or streaming it.

A client that goes away abandons its job (dropped if queued, stopped at its next decode step if running). What
the work ends with becomes the answer, or an OpenAI-shaped error; after a stream's 200 has gone out, an error is
an `{"error": ...}` event, which the openai SDK raises.
"""

from __future__ import annotations

import asyncio
import os
import sys
import traceback
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..decode_watch import DecodeStopped
from ..errors import OutOfMemoryError, SalmonnError, UsageError
from . import formats
from .api_error import SERVER_ERROR, ApiError
from .guard import CLIENT_GONE_KEY, ServerLog
from .worker import InferenceWorker, Job, shutting_down

PING_S = 15.0  # a comment line this often keeps proxies and clients from timing out a stream that is thinking
STREAM_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}


class ClientGone(Exception):
    """The client closed its connection before its answer was ready; its work was stopped."""


async def _client_gone(request: Request) -> None:
    """Returns when the client closes its connection (the body has been read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Jobs:
    """The routes' way to the worker."""

    def __init__(self, worker: InferenceWorker, log: ServerLog) -> None:
        self.worker, self.log = worker, log

    async def run(self, request: Request, work: Callable) -> Any:
        """`work(stop)` on the worker; its result, or the error it ends with as an ApiError."""
        job = self.worker.submit(work)
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            done, _ = await asyncio.wait({job.future, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if job.future not in done:
            job.abandon()
            raise ClientGone
        return self._result(job)

    def stream(
        self,
        request: Request,
        work: Callable,
        delta_event: Callable[[Any], str],
        final_events: Callable[[Any], list[str]],
        *,
        first: str | None = None,
    ) -> StreamingResponse:
        """Server-sent events for `work(stop, emit)`: `first`, one event per emitted item (a text delta, or whatever
        else the route's `delta_event` sends), then `final_events(result)`. The job is queued now, so a full queue is
        a plain 503, not a broken stream."""
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[Any] = asyncio.Queue()

        def emit(delta: Any) -> None:  # called in the worker thread
            loop.call_soon_threadsafe(deltas.put_nowait, delta)

        job = self.worker.submit(lambda stop: work(stop, emit))

        async def events() -> AsyncIterator[str]:
            gone = asyncio.ensure_future(_client_gone(request))
            try:
                if first is not None:
                    yield first
                while True:
                    getter = asyncio.ensure_future(deltas.get())
                    done, _ = await asyncio.wait({getter, job.future, gone}, timeout=PING_S,
                                                 return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                    if getter in done:
                        yield delta_event(getter.result())
                        continue
                    getter.cancel()
                    if gone in done:
                        return
                    if job.future in done:
                        break
                    yield ": ping\n\n"
                while not deltas.empty():  # what the worker emitted just before it finished
                    yield delta_event(deltas.get_nowait())
                try:
                    result = self._result(job)
                except ClientGone:
                    request.scope[CLIENT_GONE_KEY] = True
                    return
                except ApiError as error:
                    yield formats.sse(error.body())
                    return
                for event in final_events(result):
                    yield event
            finally:  # also when Starlette cancels the stream because the client left
                if not job.future.done():
                    request.scope[CLIENT_GONE_KEY] = True  # for the log line: the 200 went out, the answer did not
                    job.abandon()
                gone.cancel()

        return StreamingResponse(events(), media_type="text/event-stream", headers=STREAM_HEADERS)

    def _result(self, job: Job) -> Any:
        error = job.future.exception()
        if error is None:
            return job.future.result()
        if isinstance(error, DecodeStopped):
            raise shutting_down() if self.worker.closed else ClientGone()
        raise self.as_api_error(error)

    def as_api_error(self, error: BaseException) -> ApiError:
        """What a failure of the work means to the client; one log line for a failure that is ours."""
        if isinstance(error, ApiError):
            return error
        if isinstance(error, UsageError):  # e.g. a prompt longer than the LLM's context
            return ApiError(400, str(error), code="invalid_request")
        if isinstance(error, OutOfMemoryError):
            return ApiError(500, str(error), type=SERVER_ERROR, code="out_of_memory")
        kind = type(error).__name__
        message = str(error) if isinstance(error, SalmonnError) else f"the model failed on this request ({kind})"
        self.log.line(f"inference failed: {kind}: {error}")
        if os.environ.get("SALMONN_DEBUG") == "1":
            traceback.print_exception(error, file=sys.stderr)
        return ApiError(500, message, type=SERVER_ERROR, code="inference_failed")
