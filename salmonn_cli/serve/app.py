"""The routes: OpenAI's audio and chat endpoints, /v1/models and /health, on FastAPI.

A request is checked (fields, model name, then its audio decoded in a thread) before it waits for the model, so
a bad one is answered at once, never after a long job. The model work itself goes through the one inference
worker; a client that goes away stops its job. Every error leaves in OpenAI's shape (`api_error`).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
import time
import traceback
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..decode_watch import DecodeStopped
from ..errors import OutOfMemoryError, SalmonnError, UsageError
from . import formats, params
from .api_error import SERVER_ERROR, ApiError, missing
from .config import ServeConfig
from .guard import CLIENT_GONE, CLIENT_GONE_KEY, Guard, log_line
from .inference import ServedModel
from .intake import read_clip
from .worker import InferenceWorker, Job, shutting_down

PING_S = 15.0  # a comment line this often keeps proxies and clients from timing out a stream that is thinking
STREAM_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
MAX_FORM_FILES, MAX_FORM_FIELDS = 2, 100


class ClientGone(Exception):
    """The client closed its connection before its answer was ready; its work was stopped."""


def create_app(served: ServedModel, worker: InferenceWorker, config: ServeConfig) -> FastAPI:
    app = FastAPI(title="salmonn", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    _add_error_handlers(app)

    def model_object(model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "salmonn"}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        stats = worker.stats()
        return {"status": "ok", "model": config.served_name, "queue": stats.waiting, "busy": stats.busy,
                "served": stats.served, "cancelled": stats.cancelled, "max_in_flight": stats.max_in_flight,
                "encoded": served.encoded}  # fmt: skip

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_object(name) for name in config.model_ids]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        return model_object(params.checked_model(model_id, config))

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request) -> Response:
        return await _audio_route(request, "transcribe")

    @app.post("/v1/audio/translations")
    async def translations(request: Request) -> Response:
        return await _audio_route(request, "translate")

    async def _audio_route(request: Request, kind: str) -> Response:
        async with request.form(max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS) as form:
            upload = form.get("file")
            if upload is None:
                raise missing("file")
            if isinstance(upload, str):
                raise params.invalid("file", "'file' must be a file upload (multipart), not a text field")
            audio_request = params.audio_request(form, kind, config)
            data = await upload.read()
        clip = await run_in_threadpool(read_clip, data, "file", config.max_audio_seconds)
        if audio_request.stream:

            def finish(result) -> list[str]:
                record, _ = result
                return [formats.sse(formats.transcript_done(record.text, record.audio_seconds))]

            return _stream(request, worker, lambda stop, emit: served.transcribe(clip, audio_request, stop, emit),
                           lambda delta: formats.sse(formats.transcript_delta(delta)), finish)  # fmt: skip
        record, answer = await _run(request, worker, lambda stop: served.transcribe(clip, audio_request, stop, None))
        fmt = audio_request.response_format
        if fmt == "json":
            return JSONResponse(formats.transcription_json(record))
        if fmt == "verbose_json":
            options = audio_request.decode.options
            body = formats.transcription_verbose(
                record, answer, language=audio_request.language,
                temperature=options.temperature if options.do_sample else 0.0,
                eos_token_id=served.loaded.model.tokenizer.eos_token_id,
            )  # fmt: skip
            return JSONResponse(body)
        media = "text/vtt; charset=utf-8" if fmt == "vtt" else "text/plain; charset=utf-8"
        return PlainTextResponse(formats.transcription_text(record, fmt), media_type=media)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_request") from None
        chat = params.chat_request(body, config)
        clip = await run_in_threadpool(read_clip, chat.audio, chat.audio_param, config.max_audio_seconds)
        completion_id, now, name = f"chatcmpl-{secrets.token_hex(12)}", int(time.time()), body["model"]

        def usage(answer) -> dict[str, Any]:
            return formats.chat_usage(answer.prompt_tokens, len(answer.token_ids), answer.audio_tokens)

        if chat.stream:
            def chunk(delta, **fields) -> str:
                return formats.sse(formats.chat_chunk(completion_id, now, name, delta, with_usage=chat.include_usage,
                                                      **fields))  # fmt: skip

            def finish(answer) -> list[str]:
                events = [chunk({}, finish_reason=answer.finish_reason)]
                if chat.include_usage:
                    events.append(chunk(None, usage=usage(answer)))
                return [*events, formats.sse("[DONE]")]

            return _stream(request, worker, lambda stop, emit: served.chat(clip, chat, stop, emit),
                           lambda delta: chunk({"content": delta}), finish,
                           first=chunk({"role": "assistant", "content": ""}))  # fmt: skip
        answer = await _run(request, worker, lambda stop: served.chat(clip, chat, stop, None))
        return JSONResponse(formats.chat_completion(completion_id, now, name, answer.text, answer.finish_reason,
                                                    usage(answer)))  # fmt: skip

    from fastapi.middleware.cors import CORSMiddleware

    app.add_middleware(Guard, config=config)
    if config.cors_origins:  # outermost: a browser's preflight is answered before the key is asked for
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"], expose_headers=["x-request-id"])  # fmt: skip
    return app


# -- running a job --------------------------------------------------------------------------------------------------
async def _client_gone(request: Request) -> None:
    """Returns when the client closes its connection (the body has been read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _run(request: Request, worker: InferenceWorker, work: Callable) -> Any:
    """`work(stop)` on the worker; its result, or the error it ends with as an ApiError."""
    job = worker.submit(work)
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        done, _ = await asyncio.wait({job.future, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if job.future not in done:
        job.stop.set()  # dropped if still queued, stopped at its next step if running
        raise ClientGone
    return _result(job, worker)


def _result(job: Job, worker: InferenceWorker) -> Any:
    error = job.future.exception()
    if error is None:
        return job.future.result()
    if isinstance(error, DecodeStopped):
        raise shutting_down() if worker.closed else ClientGone()
    raise _as_api_error(error)


def _as_api_error(error: BaseException) -> ApiError:
    if isinstance(error, ApiError):
        return error
    if isinstance(error, UsageError):  # e.g. a prompt longer than the LLM's context
        return ApiError(400, str(error), code="invalid_request")
    if isinstance(error, OutOfMemoryError):
        return ApiError(500, str(error), type=SERVER_ERROR, code="out_of_memory")
    kind = type(error).__name__
    message = str(error) if isinstance(error, SalmonnError) else f"the model failed on this request ({kind})"
    log_line(f"inference failed: {type(error).__name__}: {error}")
    if os.environ.get("SALMONN_DEBUG") == "1":
        traceback.print_exception(error, file=sys.stderr)
    return ApiError(500, message, type=SERVER_ERROR, code="inference_failed")


def _stream(
    request: Request,
    worker: InferenceWorker,
    work: Callable,
    delta_event: Callable[[str], str],
    final_events: Callable[[Any], list[str]],
    *,
    first: str | None = None,
) -> StreamingResponse:
    """Server-sent events for `work(stop, emit)`: one event per emitted delta, then `final_events(result)`; an error
    after the 200 went out is an `{"error": ...}` event (the openai SDK raises it). The job is queued now, so a
    full queue is a plain 503, not a broken stream."""
    loop = asyncio.get_running_loop()
    deltas: asyncio.Queue[str] = asyncio.Queue()

    def emit(delta: str) -> None:  # called in the worker thread
        loop.call_soon_threadsafe(deltas.put_nowait, delta)

    job = worker.submit(lambda stop: work(stop, emit))

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
                result = _result(job, worker)
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
                job.stop.set()
            gone.cancel()

    return StreamingResponse(events(), media_type="text/event-stream", headers=STREAM_HEADERS)


# -- errors -------------------------------------------------------------------------------------------------------
def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.response_headers())


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> Response:
        return _error_response(error)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, error: ClientGone) -> Response:
        return Response(status_code=CLIENT_GONE)  # nobody reads it; the log line says what happened

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        where = f"{request.method} {request.url.path}"
        if error.status_code == 404:
            return _error_response(ApiError(404, f"Invalid URL ({where}): the API is under /v1 (POST "
                                            "/v1/audio/transcriptions, /v1/chat/completions, GET /v1/models)",
                                            code="unknown_url"))  # fmt: skip
        if error.status_code == 405:
            allowed = dict(error.headers or {}).get("Allow", "")
            return _error_response(ApiError(405, f"{where} is not allowed (allowed: {allowed})",
                                            code="method_not_allowed", headers={"Allow": allowed}))  # fmt: skip
        if error.status_code == 400:  # a multipart body the parser could not read
            return _error_response(ApiError(400, f"the request body could not be read: {error.detail}",
                                            code="invalid_request"))  # fmt: skip
        return _error_response(ApiError(error.status_code, str(error.detail)))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> Response:
        return _error_response(ApiError(400, f"invalid request: {error.errors()}", code="invalid_request"))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> Response:
        return _error_response(_as_api_error(error))
