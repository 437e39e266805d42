"""Errors in OpenAI's JSON shape, as HTTP responses and as in-stream SSE events.

`error_body` is the hub's one error-shaping function: every error a client sees, from the
hub itself or rewritten from an upstream, goes through it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

from starlette.responses import Response

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}
# On every answer the hub makes or passes on: a browser must never guess another type
# (an upstream's HTML reflected in an error would otherwise run as a page).
NOSNIFF = {"x-content-type-options": "nosniff"}


class ApiError(Exception):
    """A request that ends with an OpenAI-style error answer."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> dict[str, object]:
        return error_body(self.status, self.message, code=self.code, param=self.param)

    def response(self, extra_headers: Mapping[str, str] | None = None) -> Response:
        headers = {**self.headers, **(extra_headers or {})}
        return error_response(self.status, self.body(), headers)


def error_body(
    status: int, message: str, *, code: str | None = None, param: str | None = None
) -> dict[str, object]:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(
    status: int, body: dict[str, object], headers: Mapping[str, str] | None = None
) -> Response:
    """An error body (from `error_body`) as the HTTP answer: JSON, never sniffed."""
    merged = {**headers, **NOSNIFF} if headers else NOSNIFF
    return Response(
        json.dumps(body), status_code=status, headers=merged, media_type="application/json"
    )


def sse_error(status: int, message: str, *, code: str | None = None) -> bytes:
    """The event that ends a stream which broke after it had started."""
    event = {"object": "error", **error_body(status, message, code=code)}
    return b"data: " + json.dumps(event).encode() + b"\n\n"


def failure_answer(error: Exception) -> Response:
    """The answer to a request that failed before its answer started (the hub's one mapping
    of exceptions to answers, for the proxy and the FastAPI routes alike)."""
    if isinstance(error, ApiError):
        return error.response()
    log.error("unexpected error", exc_info=error)
    return error_response(500, error_body(500, "internal error in the hub"))
