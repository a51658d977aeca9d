"""The routes: OpenAI's audio and chat endpoints, /v1/models, /health and the web page (`page`), on FastAPI.

A request is checked (fields, model name, then its audio decoded in a thread) before it waits for the model, so
a bad one is answered at once, never after a long job. The model work itself goes through the one inference
worker; a client that goes away stops its job. Every error leaves in OpenAI's shape (`api_error`).
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import formats, params
from .api_error import ApiError, missing
from .config import ServeConfig
from .guard import CLIENT_GONE, Guard, ServerLog
from .inference import ServedModel
from .intake import read_clip
from .jobs import ClientGone, Jobs
from .page import add_page_routes
from .worker import InferenceWorker

MAX_FORM_FILES, MAX_FORM_FIELDS = 2, 100


def create_app(served: ServedModel, worker: InferenceWorker, config: ServeConfig) -> FastAPI:
    app = FastAPI(title="salmonn", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    log = ServerLog()
    jobs = Jobs(worker, log)
    _add_error_handlers(app, jobs)

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

            return jobs.stream(request, lambda stop, emit: served.transcribe(clip, audio_request, stop, emit),
                               formats.transcript_events(), finish)  # fmt: skip
        record, answer = await jobs.run(request, lambda stop: served.transcribe(clip, audio_request, stop, None))
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

            return jobs.stream(request, lambda stop, emit: served.chat(clip, chat, stop, emit),
                               lambda delta: chunk({"content": delta}), finish,
                               first=chunk({"role": "assistant", "content": ""}))  # fmt: skip
        answer = await jobs.run(request, lambda stop: served.chat(clip, chat, stop, None))
        return JSONResponse(formats.chat_completion(completion_id, now, name, answer.text, answer.finish_reason,
                                                    usage(answer)))  # fmt: skip

    add_page_routes(app, config, served.loaded.model.settings.trained_lora_scale)

    from fastapi.middleware.cors import CORSMiddleware

    app.add_middleware(Guard, config=config, log=log)
    if config.cors_origins:  # outermost: a browser's preflight is answered before the key is asked for
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"], expose_headers=["x-request-id"])  # fmt: skip
    return app


# -- errors -------------------------------------------------------------------------------------------------------
def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.response_headers())


def _add_error_handlers(app: FastAPI, jobs: Jobs) -> None:
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
                                            "/v1/audio/transcriptions, /v1/chat/completions, GET /v1/models); "
                                            "the web page is at /", code="unknown_url"))  # fmt: skip
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
        return _error_response(jobs.as_api_error(error))
