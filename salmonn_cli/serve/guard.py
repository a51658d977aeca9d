"""The ASGI layer in front of the routes: a request id, the Host check, the API key, the body limit, one log line.

Plain ASGI rather than Starlette's middleware classes: TrustedHostMiddleware answers in plain text, and an
exception raised from inside a `BaseHTTPMiddleware`'s body stream turns into a 500. Here every refusal is an
OpenAI-shaped JSON error, and the body limit holds whether or not the client sends a Content-Length: over the
limit by header is refused before a byte of the body is read (uvicorn sends `100 Continue` only when the app
reads, so curl never uploads it); a chunked body is counted as it arrives.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
import sys
import time
from collections.abc import Callable

from .api_error import ApiError, BodyTooLarge
from .config import LOOPBACK_NAMES, ServeConfig
from .page import PAGE_PATHS

# never behind the key: what process managers and load balancers poll, and the web page (which asks for the key)
OPEN_PATHS = frozenset({"/health", *PAGE_PATHS})
JSON_PATHS = frozenset({"/v1/chat/completions"})  # base64 audio inside JSON: a larger body limit
CLIENT_GONE = 499  # nginx's and whisper.cpp's status for a request whose client closed the connection
CLIENT_GONE_KEY = "salmonn.client_gone"  # set in the request's scope when a stream's client left mid-answer


async def send_error(send: Callable, error: ApiError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.response_headers().items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class ServerLog:
    """One line per request on stderr, through a copy of descriptor 2 made at start: while an upload is decoded,
    descriptor 2 itself points at /dev/null (`audio.decoder_chatter_silenced`), and the log must not go there too."""

    def __init__(self) -> None:
        try:
            self._stream = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
        except OSError:  # no descriptor 2 (an embedding host): Python's stderr, whatever it is
            self._stream = sys.stderr

    def line(self, text: str) -> None:
        print(f"salmonn serve: {text}", file=self._stream, flush=True)


class Guard:
    def __init__(self, app, config: ServeConfig, log: ServerLog) -> None:
        self.app, self.config, self.log = app, config, log
        self._key = config.api_key.encode() if config.api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = f"req_{secrets.token_hex(8)}"
        started, status = time.perf_counter(), {"code": 0}

        async def send_tagged(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            self._check(scope)
        except ApiError as error:
            await send_error(send_tagged, error)
        else:
            await self._forward(scope, receive, send_tagged, status)
        seconds = time.perf_counter() - started
        outcome = CLIENT_GONE if scope.get(CLIENT_GONE_KEY) else status["code"]
        if outcome == CLIENT_GONE:
            outcome = f"{CLIENT_GONE} (the client went away; its work was stopped)"
        self.log.line(f"{request_id} {scope['method']} {scope['path']} {outcome} {seconds:.2f}s")

    def _limit(self, scope) -> int:
        return self.config.max_json_bytes if scope["path"] in JSON_PATHS else self.config.max_upload_bytes

    async def _forward(self, scope, receive, send, status) -> None:
        limit, received = self._limit(scope), 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        try:
            await self.app(scope, counted_receive, send)
        except BodyTooLarge as error:  # surfaced past the routes' handlers (e.g. from a stream): answer if we can
            if not status["code"]:
                await send_error(send, error)

    def _check(self, scope) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.config.loopback and not _loopback_host(headers.get("host", "")):
            # a web page on another name that resolves here (DNS rebinding) must not reach a loopback server
            raise ApiError(400, "the Host header must name this machine (localhost or 127.0.0.1) when the server "
                           "listens on loopback", code="invalid_host")  # fmt: skip
        if self._key is not None and scope["path"] not in OPEN_PATHS and scope["method"] != "OPTIONS":
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._key):
                raise ApiError(401, "a valid API key is needed: Authorization: Bearer <key> (--api-key)",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._limit(scope):
            raise BodyTooLarge(self._limit(scope))


def _loopback_host(host: str) -> bool:
    name = host.strip().lower()
    if name.startswith("["):  # [::1]:8000
        name = name[1 : name.find("]")] if "]" in name else name
    else:
        name = name.rsplit(":", 1)[0]
    return name in LOOPBACK_NAMES
