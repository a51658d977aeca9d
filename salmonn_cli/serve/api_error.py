"""Errors as OpenAI sends them: `{"error": {"message", "type", "param", "code"}}` with the right HTTP status.

Clients (the openai SDK, Open WebUI) read `error.message` and `error.code`, and the SDK retries 408, 409, 429 and
every 5xx unless the response says `x-should-retry: false`: only a full queue (503) is worth a retry here.
"""

from __future__ import annotations

from typing import Any

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"


class ApiError(Exception):
    """One failed request: its status, OpenAI's four error fields, and any extra response headers."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response_headers(self) -> dict[str, str]:
        retry = "true" if self.status == 503 else "false"  # the same request would fail the same way
        return {"x-should-retry": retry, **self.headers}


def missing(param: str) -> ApiError:
    return ApiError(400, f"you must provide a '{param}' parameter", param=param, code="missing_required_parameter")


def invalid(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value")


def bad_audio(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_audio")


def too_large(limit_bytes: int) -> ApiError:
    mib = limit_bytes / 2**20
    return ApiError(413, f"the request body is over the server's limit of {mib:g} MiB (--max-upload-mb)",
                    param="file", code="request_too_large")  # fmt: skip


class BodyTooLarge(ApiError):
    """Raised from inside the body stream when it passes the limit, and answered 413 wherever it surfaces."""

    def __init__(self, limit_bytes: int) -> None:
        error = too_large(limit_bytes)
        super().__init__(413, error.message, param=error.param, code=error.code)
