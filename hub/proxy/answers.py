"""What the client gets of an upstream's answer: a whole body, a stream, or an error.

Of the upstream's response headers only an allow-list passes (the content type of a
successful answer, Retry-After of a refusal): provider headers (organisation, rate limits
of the hub's own account, cookies, debug headers) stay behind. Errors from upstreams are
rebuilt in OpenAI's error shape (`hub.errors.error_body`), never passed as they came.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from hub.errors import NOSNIFF, ApiError, sse_error
from hub.proxy.outcome import Outcome
from hub.proxy.sse import UsageTap, usage_from_body
from hub.upstreams.base import UpstreamError, UpstreamResponse

log = logging.getLogger(__name__)

MAX_ERROR_BODY = 64 * 1024
MAX_ANSWER_BODY = 64 * 1024 * 1024
MAX_ERROR_MESSAGE = 500
STREAM_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def passed_headers(response: UpstreamResponse) -> dict[str, str]:
    """The upstream's headers a client may see (an allow-list, not a deny-list)."""
    wanted = "retry-after" if response.status >= 400 else "content-type"
    passed = {}
    for name, value in response.headers:  # one pass, one lower(): this runs per request
        if len(name) == len(wanted) and name.lower() == wanted:
            passed[wanted] = value
    return passed


def is_event_stream(response: UpstreamResponse) -> bool:
    if response.status >= 400:
        return False
    for name, value in response.headers:
        if len(name) == 12 and name.lower() == "content-type":
            return value.startswith("text/event-stream")
    return False


async def read_limited(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise UpstreamError(502, "the upstream's answer is too large")
        parts.append(chunk)
    return b"".join(parts)


def upstream_error(status: int, body: bytes, headers: dict[str, str]) -> ApiError:
    """An upstream's error answer as the client sees it: OpenAI's error JSON, rebuilt from
    the upstream's message (plain text only) or, failing that, from its status alone."""
    if status in (401, 403, 407):
        # The upstream refused the hub's own credentials: not the client's fault.
        return ApiError(502, "the upstream refused the hub's credentials", code="upstream_auth")
    error = _error_object(body)
    if error is None:  # no OpenAI error (an HTML page from a proxy...): nothing of it passes
        client_status = status if status < 500 else 502
        return ApiError(
            client_status, f"upstream answered {status}", code="upstream_error", headers=headers
        )
    message, param, code = error.get("message"), error.get("param"), error.get("code")
    return ApiError(
        status if status < 500 or status in (503, 504) else 502,
        str(message)[:MAX_ERROR_MESSAGE] if message else f"upstream answered {status}",
        param=param if isinstance(param, str) else None,
        code=code if isinstance(code, str) else "upstream_error",
        headers=headers,
    )


def _error_object(body: bytes) -> dict[str, Any] | None:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    error = payload.get("error") if isinstance(payload, dict) else None
    return error if isinstance(error, dict) else None


async def whole_answer(
    response: UpstreamResponse, outcome: Outcome, headers: dict[str, str]
) -> Response:
    """A non-streamed answer (or an upstream error) read whole and passed on."""
    limit = MAX_ERROR_BODY if response.status >= 400 else MAX_ANSWER_BODY
    body = await read_limited(response.chunks, limit)
    outcome.first_chunk = time.perf_counter()
    passed = passed_headers(response)
    if response.status >= 400:
        error = upstream_error(response.status, body, passed)
        outcome.status = error.status
        return error.response(headers)
    outcome.usage = usage_from_body(body)
    if outcome.target != outcome.model:
        body = rename_model(body, outcome.target, outcome.model)
    outcome.status = response.status
    merged = {**passed, **headers, **NOSNIFF}
    return Response(body, status_code=response.status, headers=merged)


class UpstreamStreamingResponse(StreamingResponse):
    """Starlette's streaming response that owns the request's exit stack until the stream
    has ended, however it ends.

    Starlette's HTTP behaviour is kept (the stream stops when the client disconnects; the
    background task runs after it), on an asyncio TaskGroup instead of Starlette's anyio
    task group, which costs ~0.1 ms more per stream (tests/hub/proxy/test_streaming_response.py
    holds this class to Starlette's behaviour).
    """

    def __init__(
        self,
        stack: AsyncExitStack,
        content: AsyncGenerator[bytes, None],
        status: int,
        headers: dict[str, str],
    ) -> None:
        super().__init__(content, status_code=status, headers=headers)
        self._stack = stack
        self._content = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with self._stack:
            try:
                await self._stream_until_disconnected(scope, receive, send)
            finally:
                # A stream cancelled while it waited (client gone) is finished here, before
                # the stack closes the upstream and records the outcome.
                await self._content.aclose()
        if self.background is not None:
            await self.background()

    async def _stream_until_disconnected(self, scope: Scope, receive: Receive, send: Send) -> None:
        spec = scope.get("asgi", {}).get("spec_version", "2.0")
        if tuple(int(part) for part in spec.split(".")) >= (2, 4):
            # An ASGI 2.4 server reports a client gone by an OSError from send (Starlette
            # raises ClientDisconnect then; the hub has nobody to tell).
            with contextlib.suppress(OSError):
                await self.stream_response(send)
            return
        async with asyncio.TaskGroup() as group:
            streaming = group.create_task(self.stream_response(send))
            watching = group.create_task(self.listen_for_disconnect(receive))
            streaming.add_done_callback(lambda _: watching.cancel())
            watching.add_done_callback(lambda _: streaming.cancel())


def stream_answer(
    stack: AsyncExitStack, response: UpstreamResponse, outcome: Outcome, headers: dict[str, str]
) -> UpstreamStreamingResponse:
    """The streamed answer; the client sees the usage it asked for (`outcome.usage_wish`)."""
    tap = UsageTap(outcome.usage_wish)
    merged = {**passed_headers(response), **headers, **STREAM_HEADERS, **NOSNIFF}
    content = client_stream(response, tap, outcome)
    return UpstreamStreamingResponse(stack, content, response.status, merged)


async def client_stream(
    response: UpstreamResponse, tap: UsageTap, outcome: Outcome
) -> AsyncGenerator[bytes, None]:
    """The client's stream: upstream chunks as they come, minus the usage not asked for."""
    try:
        async for chunk in response.chunks:
            out = tap.feed(chunk)
            if out and outcome.target != outcome.model:
                out = rename_model(out, outcome.target, outcome.model)
            if out:
                if outcome.first_chunk is None:
                    outcome.first_chunk = time.perf_counter()
                yield out
        rest = tap.flush()
        if rest and outcome.target != outcome.model:
            rest = rename_model(rest, outcome.target, outcome.model)
        if rest:
            yield rest
        outcome.status = response.status if tap.error is None else 502
    except UpstreamError as error:
        log.warning("stream %s from %s broke: %s", outcome.request_id, outcome.upstream, error)
        outcome.status = error.status
        yield sse_error(error.status, error.message, code=error.code)
    finally:
        outcome.usage = tap.estimate


def rename_model(data: bytes, target: str, public: str) -> bytes:
    """Answers of an aliased model name the public id; a byte replacement, no re-encoding."""
    for separator in (b":", b": "):
        old = b'"model"' + separator + json.dumps(target).encode()
        if old in data:
            data = data.replace(old, b'"model"' + separator + json.dumps(public).encode())
    return data
