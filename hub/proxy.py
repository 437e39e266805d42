"""One API request from the client to an upstream and back, with accounting.

The handler authenticates, admits (limits), rewrites the body (alias, hooks, usage request)
and opens the upstream response. Everything that must happen when the request ends (release
the in-flight slot, close the upstream response, record usage and metrics) is registered on
one AsyncExitStack, owned by the handler until a stream starts and by the streaming response
afterwards, so a client that goes away mid-stream releases everything.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from hub.accounting import UsageRecord
from hub.auth import Principal
from hub.config import ModelConfig
from hub.errors import ApiError, error_body, sse_error
from hub.hooks import apply_hooks, ask_for_usage
from hub.services import HubServices
from hub.sse import Usage, UsageTap, usage_from_body
from hub.upstream import (
    Upstream,
    UpstreamError,
    UpstreamRequest,
    UpstreamResponse,
    forwardable,
)

log = logging.getLogger(__name__)

MAX_ERROR_BODY = 64 * 1024
MAX_ANSWER_BODY = 64 * 1024 * 1024
CLIENT_GONE = 499
UNAVAILABLE_RETRY_AFTER = 5  # seconds, when no upstream site is reachable


@dataclass
class Outcome:
    """What is known about a request when it ends; filled in as it runs."""

    endpoint: str
    model: str
    upstream: str
    principal: Principal
    stream: bool
    started_at: float
    started: float  # perf_counter
    request_id: str
    target: str  # the upstream's name for the model
    status: int = CLIENT_GONE
    usage: Usage | None = None
    first_chunk: float | None = None
    extra: dict[str, str] = field(default_factory=dict)


async def read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"request body larger than {limit} bytes", code="body_too_large")
    parts: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body larger than {limit} bytes", code="body_too_large")
        parts.append(chunk)
    return b"".join(parts)


def parse_request(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "`model` is required", param="model", code="missing_model")
    return payload


def resolve_model(services: HubServices, principal: Principal, model_id: str) -> ModelConfig:
    model = services.config.model(model_id)
    if model is None:
        raise ApiError(
            404, f"the model `{model_id}` does not exist", param="model", code="model_not_found"
        )
    if not principal.allows(model_id):
        raise ApiError(
            403,
            f"this key may not use the model `{model_id}`",
            param="model",
            code="model_not_allowed",
        )
    return model


def finish(services: HubServices, outcome: Outcome) -> None:
    """Record usage and metrics of a finished request (never awaits)."""
    now = time.perf_counter()
    usage = outcome.usage or Usage(0, 0)
    ttft = outcome.first_chunk - outcome.started if outcome.first_chunk else None
    principal = outcome.principal
    services.metrics.observe(
        model=outcome.model,
        upstream=outcome.upstream,
        endpoint=outcome.endpoint,
        status=outcome.status,
        seconds=now - outcome.started,
        ttft=ttft,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
    )
    record = UsageRecord(
        request_id=outcome.request_id,
        key_id=principal.key_id,
        user_name=principal.user,
        group_name=principal.group,
        model=outcome.model,
        upstream=outcome.upstream,
        endpoint=outcome.endpoint,
        status=outcome.status,
        stream=outcome.stream,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        latency_ms=(now - outcome.started) * 1000,
        ttft_ms=ttft * 1000 if ttft else None,
        started_at=outcome.started_at,
        finished_at=outcome.started_at + (now - outcome.started),
    )
    subjects = tuple(subject for subject, _ in principal.subjects)
    services.recorder.record(record, subjects)


class UpstreamStreamingResponse(StreamingResponse):
    """A streaming answer that owns the request's exit stack until the stream ends.

    Streamed in two asyncio tasks (the chunks, and a watch for the client's disconnect,
    which uvicorn's `send` does not report) instead of Starlette's anyio task group, which
    costs more per stream.
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
                async with asyncio.TaskGroup() as group:
                    streaming = group.create_task(self.stream_response(send))
                    watching = group.create_task(_until_disconnected(receive))
                    streaming.add_done_callback(lambda _: watching.cancel())
                    watching.add_done_callback(lambda _: streaming.cancel())
            finally:
                # A stream cancelled while it waited in `send` is finished here, before the
                # stack closes the upstream and records the outcome.
                await self._content.aclose()


async def _until_disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def relay(
    response: UpstreamResponse, tap: UsageTap, outcome: Outcome
) -> AsyncGenerator[bytes, None]:
    """The client's stream: upstream chunks as they come, minus the usage chunk if unasked."""
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
        outcome.usage = tap.usage


async def read_limited(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise UpstreamError(502, "the upstream's answer is too large")
        parts.append(chunk)
    return b"".join(parts)


def upstream_error_body(status: int, body: bytes) -> tuple[int, bytes]:
    """What the client sees of an upstream's error answer (always OpenAI's error JSON)."""
    if status in (401, 403, 407):
        # The upstream refused the hub's own credentials: not the client's fault.
        error = ApiError(502, "the upstream refused the hub's credentials", code="upstream_auth")
        return 502, json.dumps(error.body()).encode()
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        payload = None
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        return status, body
    text = body[:500].decode("utf-8", "replace").strip() or f"upstream answered {status}"
    return status, json.dumps(ApiError(status, text, code="upstream_error").body()).encode()


async def complete(
    response: UpstreamResponse, outcome: Outcome, headers: dict[str, str]
) -> Response:
    """A non-streamed answer (or an upstream error) read whole and passed on."""
    limit = MAX_ERROR_BODY if response.status >= 400 else MAX_ANSWER_BODY
    body = await read_limited(response.chunks, limit)
    outcome.first_chunk = time.perf_counter()
    status = response.status
    if status >= 400:
        status, body = upstream_error_body(status, body)
    else:
        outcome.usage = usage_from_body(body)
        if outcome.target != outcome.model:
            body = rename_model(body, outcome.target, outcome.model)
    outcome.status = status
    merged = {**dict(forwardable(response.headers)), **headers}
    return Response(body, status_code=status, headers=merged)


def rename_model(data: bytes, target: str, public: str) -> bytes:
    """Answers of an aliased model name the public id; a byte replacement, no re-encoding."""
    for separator in (b":", b": "):
        old = b'"model"' + separator + json.dumps(target).encode()
        if old in data:
            data = data.replace(old, b'"model"' + separator + json.dumps(public).encode())
    return data


def new_request_id() -> str:
    return f"req-{secrets.token_hex(16)}"


def _rewrite(
    payload: dict[str, Any], body: bytes, model: ModelConfig, endpoint: str
) -> tuple[bytes, bool, bool]:
    """Upstream body, whether it streams, whether the client asked for the usage chunk."""
    rewritten = apply_hooks(payload, model.hooks, endpoint)
    rewritten["model"] = model.target
    stream = rewritten.get("stream") is True
    client_asked = False
    if stream:
        rewritten, client_asked = ask_for_usage(rewritten)
    elif rewritten == payload and _one_model_key(body):
        return body, stream, client_asked  # nothing changed: the client's bytes as they are
    return json.dumps(rewritten, separators=(",", ":")).encode(), stream, client_asked


def _one_model_key(body: bytes) -> bool:
    """Whether `model` is spelled once and plainly, so that the upstream cannot read another
    model than the hub checked (JSON parsers differ on duplicate keys). A quote inside a
    string is escaped, so `"model"` in the bytes is a key or a value; only a \\u escape
    could spell it otherwise."""
    return body.count(b'"model"') == 1 and b"\\u" not in body


async def serve_proxied(
    services: HubServices, endpoint: str, scope: Scope, receive: Receive, send: Send
) -> None:
    """The ASGI answer to POST /v1/<endpoint>: what the app's error handlers would send."""
    try:
        response = await handle(services, Request(scope, receive), endpoint)
    except ApiError as error:
        response = error.response()
    except ClientDisconnect:
        return  # gone while sending the body: nobody to answer
    except Exception as error:
        log.error("unexpected error", exc_info=error)
        response = JSONResponse(error_body(500, "internal error in the hub"), status_code=500)
    await response(scope, receive, send)


async def handle(services: HubServices, request: Request, endpoint: str) -> Response:
    """POST /v1/<endpoint> (and vLLM's /tokenize, /detokenize)."""
    started_at, started = time.time(), time.perf_counter()
    client = request.client.host if request.client else None
    principal = await services.auth.authenticate(request.headers, client, started_at)
    raw = await read_body(request, services.config.max_body_bytes)
    payload = parse_request(raw)
    model = resolve_model(services, principal, payload["model"])
    upstream = services.upstreams[model.upstream]
    body, stream, client_asked = _rewrite(payload, raw, model, endpoint)
    outcome = Outcome(
        endpoint,
        model.id,
        upstream.name,
        principal,
        stream,
        started_at,
        started,
        new_request_id(),
        model.target,
    )
    try:
        limit_headers = await services.admission.admit(principal, started_at)
    except ApiError as error:
        outcome.status = error.status
        services.metrics.rejected.labels("rate_limit").inc()
        finish(services, outcome)
        raise
    return await _forward(services, upstream, outcome, body, client_asked, limit_headers)


def _hold(services: HubServices, outcome: Outcome, limit_headers: dict[str, str]) -> AsyncExitStack:
    """The request's exit stack: outcome recorded, in-flight slot and gauge given back."""
    try:
        release = services.admission.acquire(outcome.principal, limit_headers)
    except ApiError as error:  # over the concurrency cap
        outcome.status = error.status
        finish(services, outcome)
        raise
    stack = AsyncExitStack()
    stack.callback(finish, services, outcome)
    stack.callback(release)
    gauge = services.metrics.in_flight_of(outcome.model, outcome.upstream)
    gauge.inc()
    stack.callback(gauge.dec)
    return stack


def _stream_headers(response: UpstreamResponse, headers: dict[str, str]) -> dict[str, str]:
    extra = {"cache-control": "no-cache", "x-accel-buffering": "no"}
    return {**dict(forwardable(response.headers)), **headers, **extra}


async def _forward(
    services: HubServices,
    upstream: Upstream,
    outcome: Outcome,
    body: bytes,
    client_asked: bool,
    limit_headers: dict[str, str],
) -> Response:
    headers = {**limit_headers, "x-request-id": outcome.request_id}
    stack = _hold(services, outcome, limit_headers)
    handed_over = False
    try:
        path = _path(outcome.endpoint)
        request = UpstreamRequest("POST", path, body, outcome.target, outcome.request_id)
        response = await stack.enter_async_context(upstream.stream(request))
        if not outcome.stream or response.status >= 400:
            return await complete(response, outcome, headers)
        tap = UsageTap(strip_usage=not client_asked)
        handed_over = True
        return UpstreamStreamingResponse(
            stack,
            relay(response, tap, outcome),
            response.status,
            _stream_headers(response, headers),
        )
    except UpstreamError as error:
        outcome.status = error.status
        if error.status == 503:
            headers = {**headers, "Retry-After": str(UNAVAILABLE_RETRY_AFTER)}
        raise ApiError(error.status, error.message, code=error.code, headers=headers) from None
    finally:
        if not handed_over:
            await stack.aclose()


def _path(endpoint: str) -> str:
    return f"/{endpoint}" if endpoint in ("tokenize", "detokenize") else f"/v1/{endpoint}"
