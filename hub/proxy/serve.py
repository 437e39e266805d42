"""One API request from the client to an upstream and back, with accounting.

`serve_proxied` is the one way into the proxy (HubApp sends every request to a proxied path
here, before FastAPI's routing) and holds the one mapping of failures to answers. The
handler authenticates, admits (limits), rewrites the body (alias, hooks, usage request)
and opens the upstream response. Everything that must happen when the request ends (release
the in-flight slot, close the upstream response, record usage and metrics) is registered on
one AsyncExitStack, owned by the handler until a stream starts and by the streaming response
afterwards, so a client that goes away mid-stream releases everything.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncIterable
from contextlib import AsyncExitStack

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from hub.auth import Principal
from hub.config import ModelConfig
from hub.endpoints import ROUTES, endpoint_name
from hub.errors import ApiError, failure_answer
from hub.proxy.answers import is_event_stream, stream_answer, whole_answer
from hub.proxy.anthropic_api import MESSAGES, anthropic_answer, with_api_key
from hub.proxy.multipart_body import read_model, renamed, too_large, whole_body
from hub.proxy.outcome import Outcome, finish
from hub.proxy.request_body import UpstreamBody, parse_request, read_body, rewrite
from hub.services import HubServices
from hub.upstreams import tracing
from hub.upstreams.base import Upstream, UpstreamError, UpstreamRequest
from hub.usage.admission import request_class

log = logging.getLogger(__name__)

UNAVAILABLE_RETRY_AFTER = 5  # seconds, when no upstream site is reachable
AUDIO = ("audio/transcriptions", "audio/translations")  # multipart uploads


async def serve_proxied(
    services: HubServices, endpoint: str, scope: Scope, receive: Receive, send: Send
) -> None:
    """The ASGI answer to POST /v1/<endpoint> (and vLLM's /tokenize, /detokenize)."""
    with tracing.request_span(endpoint):  # a no-op unless tracing is configured
        try:
            response = await handle(services, Request(scope, receive), endpoint)
        except ClientDisconnect:
            return  # gone while sending the body: nobody to answer
        except Exception as error:  # every failure becomes an answer
            response = failure_answer(error)
        if endpoint == MESSAGES:
            response = anthropic_answer(response)
        tracing.note_status(response.status_code)
        await response(scope, receive, send)


async def resolve_model(services: HubServices, principal: Principal, model_id: str) -> ModelConfig:
    model = await services.resolve(model_id)
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


def check_endpoint(model: ModelConfig, endpoint: str) -> None:
    """Refuse an endpoint the hub's config says the model does not serve (the agent checks
    what its services declare: a hub override need not be sent to learn it)."""
    name = endpoint_name(endpoint)
    if model.endpoints is not None and name not in model.endpoints:
        served = ", ".join(model.endpoints)
        message = f"the model `{model.id}` does not serve /{endpoint}; it serves: {served}"
        raise ApiError(404, message, param="model", code="endpoint_not_served")


def new_request_id() -> str:
    return f"req-{secrets.token_hex(16)}"


async def handle(services: HubServices, request: Request, endpoint: str) -> Response:
    started_at, started = time.time(), time.perf_counter()
    client = request.client.host if request.client else None
    headers = with_api_key(request.headers) if endpoint == MESSAGES else request.headers
    with tracing.phase("hub.auth"):
        principal = await services.auth.authenticate(headers, client, started_at)
    priority = request_class(request.headers)
    model, upstream_body, content_type = await _prepare(services, principal, request, endpoint)
    upstream = services.upstreams[model.upstream]
    outcome = Outcome(
        endpoint,
        model.id,
        upstream.name,
        principal,
        upstream_body.stream,
        started_at,
        started,
        new_request_id(),
        model.target,
        upstream_body.usage_wish,
    )
    try:
        with tracing.phase("hub.admission"):
            limit_headers = await services.admission.admit(principal, started_at)
    except ApiError as error:
        outcome.status = error.status
        services.metrics.rejected.labels("rate_limit").inc()
        finish(services, outcome)
        raise
    body = upstream_body.body
    return await _forward(services, upstream, outcome, body, limit_headers, priority, content_type)


async def _prepare(
    services: HubServices, principal: Principal, request: Request, endpoint: str
) -> tuple[ModelConfig, UpstreamBody, str]:
    """The model, the upstream's body and its content type."""
    if endpoint in AUDIO:
        return await _prepare_audio(services, principal, request, endpoint)
    raw = await read_body(request, services.config.max_body_bytes)
    payload = parse_request(raw)
    model = await resolve_model(services, principal, payload["model"])
    check_endpoint(model, endpoint)
    per_chunk = services.upstreams[model.upstream].usage_per_chunk
    return model, rewrite(payload, raw, model, endpoint, per_chunk), "application/json"


async def _prepare_audio(
    services: HubServices, principal: Principal, request: Request, endpoint: str
) -> tuple[ModelConfig, UpstreamBody, str]:
    """An audio upload (multipart): read up to the end of its `model` field, so a client
    that sends it first is refused before its upload is read; the model is renamed for an
    alias, and the rest streams on to the upstream as the client sends it (bounded)."""
    content_type, limit = request.headers.get("content-type", ""), services.config.max_body_bytes
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_large(limit)
    chunks = request.stream()
    model_id, where, pieces = await read_model(chunks, content_type, limit)
    model = await resolve_model(services, principal, model_id)
    check_endpoint(model, endpoint)
    head = b"".join(pieces)
    size = len(head)
    if model.target != model.id:
        head = renamed(head, where, model.target)
    return model, UpstreamBody(whole_body(head, size, chunks, limit), False, "none"), content_type


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


async def _forward(
    services: HubServices,
    upstream: Upstream,
    outcome: Outcome,
    body: bytes | AsyncIterable[bytes],
    limit_headers: dict[str, str],
    priority: str = "",
    content_type: str = "application/json",
) -> Response:
    headers = {**limit_headers, "x-request-id": outcome.request_id}
    stack = _hold(services, outcome, limit_headers)
    handed_over = False
    try:
        path = ROUTES[outcome.endpoint]
        who = outcome.principal
        request = UpstreamRequest(
            "POST", path, body, outcome.target, outcome.request_id,
            who.user or "", who.key_id or "", who.group or "", priority, content_type,
        )  # fmt: skip
        trace = tracing.upstream(stack, outcome.model, upstream.name)
        with trace.connect():
            response = await stack.enter_async_context(upstream.stream(request))
        response = trace.body(response)
        # Whatever streams is metered as a stream, whether the hub expected one or not.
        if not is_event_stream(response):
            return await whole_answer(response, outcome, headers)
        outcome.stream = handed_over = True
        return stream_answer(stack, response, outcome, headers)
    except UpstreamError as error:
        outcome.status = error.status
        if error.status == 503:
            headers = {**headers, "Retry-After": str(UNAVAILABLE_RETRY_AFTER)}
        raise ApiError(error.status, error.message, code=error.code, headers=headers) from None
    finally:
        if not handed_over:
            await stack.aclose()
