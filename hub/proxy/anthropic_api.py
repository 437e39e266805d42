"""What differs on Anthropic's Messages API (/v1/messages): the key may come as `x-api-key`,
and errors have Anthropic's shape (`{"type": "error", "error": {"type", "message"}}`, in a
stream as an `event: error`), which Anthropic's SDKs and Claude Code read.

The hub's one error mapping stays `hub.errors`; its answers are translated here, last.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Mapping

from starlette.datastructures import Headers
from starlette.responses import Response, StreamingResponse

MESSAGES = "messages"
# Anthropic's error types by status (docs.anthropic.com/en/api/errors).
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
_OPENAI_STREAM_ERROR = b'data: {"object": "error"'
Content = str | bytes | memoryview


def with_api_key(headers: Headers) -> Mapping[str, str]:
    """The request's headers, `x-api-key` read as the Bearer key when there is no
    Authorization header (Anthropic's SDKs send the key that way)."""
    key = headers.get("x-api-key")
    if not key or "authorization" in headers:
        return headers
    return {**dict(headers.items()), "authorization": f"Bearer {key.strip()}"}


def error_object(status: int, message: str) -> dict[str, object]:
    kind = _TYPES.get(status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def anthropic_answer(response: Response) -> Response:
    """An answer of /v1/messages with its errors in Anthropic's shape (a whole error body,
    or an error event ending a stream)."""
    if isinstance(response, StreamingResponse):
        response.body_iterator = _stream_errors(response.body_iterator)
        return response
    if response.status_code < 400:
        return response
    try:
        message = json.loads(bytes(response.body))["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response
    body = json.dumps(error_object(response.status_code, str(message))).encode()
    headers = {k: v for k, v in response.headers.items() if k != "content-length"}
    return Response(body, status_code=response.status_code, headers=headers)


async def _stream_errors(chunks: AsyncIterable[Content]) -> AsyncIterator[bytes]:
    """The hub's own stream-ending error event (OpenAI's shape) as Anthropic's `error`."""
    async for chunk in chunks:
        data = chunk.encode() if isinstance(chunk, str) else bytes(chunk)
        if data.startswith(_OPENAI_STREAM_ERROR):
            yield _anthropic_event(data)
        else:
            yield data


def _anthropic_event(data: bytes) -> bytes:
    try:
        error = json.loads(data[6:])["error"]
        status = {"timeout_error": 504, "upstream_error": 502}.get(error.get("type"), 500)
        event = error_object(status, str(error.get("message")))
    except (ValueError, KeyError, TypeError, AttributeError):
        event = error_object(500, "the stream broke off")
    return b"event: error\ndata: " + json.dumps(event).encode() + b"\n\n"
