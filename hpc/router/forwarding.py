"""Forwarding one routed request to a backend model server, streaming the answer back.

The router hands over a validated request and a `ResponseSink`; this module picks a backend
(waiting for one when none is ready), keeps the registry's load counters, and never loses a
request to a backend that dies before answering: the request waits (bounded by
`queue_timeout`) for a ready backend, e.g. the dead one's replacement, and is sent there.
A break after the response started ends with an OpenAI-style error event, never a silent
truncation. An upload (`hpc.router.upload.Upload`) streams into the backend request as it
arrives; once a byte of it was sent, a failed backend is not retried (the body is gone).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Protocol

from hpc.config import FairnessConfig, RouterConfig, ServiceConfig
from hpc.registry import Backend, BackendRegistry
from hpc.router.fair_queue import Class, FairQueue, Ticket
from hpc.router.policy import queue_is_full, retry_delay
from hpc.router.slots import ServiceSlots, Waiter
from hpc.router.upload import Upload
from saia.base.endpoints import ENDPOINT_PATHS, Endpoint
from saia.base.http11 import (
    Body,
    BodyStream,
    ConnectFailed,
    HttpClient,
    HttpResponse,
    NoResponse,
    ResponseBroken,
)
from saia.base.pinned_tls import pinned_context
from saia.base.protocol import Caller, RequestHead

log = logging.getLogger(__name__)

# Never forwarded in either direction: hop-by-hop, or set by the hop itself.
HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "expect",
    }
)
CLIENT_ONLY = frozenset(
    {"authorization", "cookie", "accept-encoding", "forwarded", "x-forwarded-for"}
    | {"x-forwarded-host", "x-forwarded-proto", "x-real-ip", "api-key"}
)
TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz")
RETRY_AFTER_NOT_READY = "30"
# The allow-list: the only (method, path) pairs forwarded to a backend, each an endpoint
# (a service serves those it declares).
FORWARDED_ENDPOINTS: dict[tuple[str, str], Endpoint] = {
    ("POST", path): endpoint for path, endpoint in ENDPOINT_PATHS.items()
}
FORWARDED = frozenset(FORWARDED_ENDPOINTS)
BATCH_PRIORITY = 1  # vLLM's priority field: lower runs first, 0 is the default


class ResponseSink(Protocol):
    """Where the answer of one request goes (a stream of the hop channel)."""

    def start(self, status: int, headers: list[tuple[str, str]]) -> None: ...

    async def send(self, data: bytes) -> None: ...

    def finish(self) -> None: ...

    def fail(self, status: int, code: str, message: str) -> None: ...


class Rejection(Exception):
    """Answer the request with this error instead of forwarding it."""

    def __init__(self, status: int, code: str, message: str, retry_after: str | None = None):
        super().__init__(message)
        self.status, self.code, self.retry_after = status, code, retry_after


class Unreachable(Exception):
    """The backend failed before sending any response byte: another one may take it."""


def _upload_failed(backend: Backend, name: str, error: Exception) -> Rejection:
    """A backend failed while an upload streamed into it: the bytes sent are gone, so no
    other backend can take the request; the client may send it again."""
    log.warning(
        "backend %s of %s failed while receiving an upload: %s", backend.job_id, name, error
    )
    message = "the model server failed while receiving the upload; send it again"
    return Rejection(502, "upload_failed", message)


def error_body(message: str, kind: str, code: str | int, param: str | None = None) -> bytes:
    error = {"message": message, "type": kind, "param": param, "code": code}
    return json.dumps({"error": error}).encode()


def backend_headers(headers: list[tuple[str, str]], api_key: str | None) -> list[tuple[str, str]]:
    """The client's headers minus hop-by-hop and credentials, plus the backend's own key."""
    named_by_connection = {
        token.strip().lower()
        for name, value in headers
        if name.lower() == "connection"
        for token in value.split(",")
    }
    out = []
    for name, value in headers:
        lower = _forwardable(name)
        if lower is None:
            raise Rejection(400, "invalid_header", "a request header name is not valid")
        if lower and lower not in named_by_connection:
            out.append((name, value))
    out.append(("accept-encoding", "identity"))
    return with_key(out, api_key)


def ticket_of(caller: Caller, fairness: FairnessConfig, arrival: float) -> Ticket:
    """The request's flow (its user, else its key), class and weight, from the hop head."""
    flow = f"user:{caller.user}" if caller.user else f"key:{caller.key}" if caller.key else ""
    batch = caller.priority == "batch" or (caller.key and caller.key in fairness.batch_keys)
    weight = fairness.key_weights.get(caller.key) or fairness.group_weights.get(caller.group, 1.0)
    klass: Class = "batch" if batch else "interactive"
    return Ticket(flow, klass, weight, arrival)


def with_priority(body: bytes, klass: Class, service: ServiceConfig) -> bytes:
    """The body with vLLM's `priority` set from the class, for a service whose backends
    schedule by priority; a client's own `priority` there is replaced (it could jump the
    backend's queue). Other services get the body unchanged (parsed only when needed)."""
    if service.vllm.scheduling_policy != "priority":
        return body
    if klass == "interactive" and b'"priority"' not in body:
        return body  # vLLM's default priority, 0, is interactive's
    try:
        payload = json.loads(body)
    except ValueError:
        return body  # the backend answers a broken body with its own 400
    if not isinstance(payload, dict):
        return body
    payload["priority"] = BATCH_PRIORITY if klass == "batch" else 0
    return json.dumps(payload).encode()


def check_endpoint(service: ServiceConfig, head: RequestHead) -> None:
    """Refuse (404) a path of the allow-list that this service does not serve (a chat model
    asked to rerank): its backend would answer 404 or 400 in its own words, or not at all."""
    endpoint = FORWARDED_ENDPOINTS.get((head.method, head.path))
    served = service.served_endpoints
    if endpoint not in served:
        message = (
            f"the model {service.model_id[:200]!r} does not serve {head.path[:200]}; "
            f"it serves: {', '.join(served)}"
        )
        raise Rejection(404, "endpoint_not_served", message)


def retry_after(seconds: float) -> int:
    """A Retry-After value from an expected wait: whole seconds, 1 to 300."""
    return max(1, min(300, round(seconds)))


def with_key(headers: list[tuple[str, str]], api_key: str | None) -> list[tuple[str, str]]:
    return [*headers, ("authorization", f"Bearer {api_key}")] if api_key else headers


@functools.lru_cache(maxsize=1024)
def _forwardable(name: str) -> str | None:
    """A header name in lower case; "" if it is never forwarded, None if it is not a token."""
    lower = name.lower()
    if not lower or not set(lower) <= TOKEN_CHARS:
        return None
    return "" if lower in HOP_HEADERS or lower in CLIENT_ONLY else lower


def response_headers(headers: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], bool]:
    """The backend's headers to pass on, and whether the body is an event stream."""
    out = []
    event_stream = False
    for name, value in headers:  # one pass: this runs for every response
        lower = name.lower()
        if lower == "content-type" and value.startswith("text/event-stream"):
            event_stream = True
        if lower not in HOP_HEADERS:
            out.append((name, value))
    return out, event_stream


class Forwarder:
    """Sends requests to the registry's backends over the router's keep-alive client.

    Requests wait in one fair queue per service (`hpc.router.slots.ServiceSlots`) until a
    backend has a free slot."""

    def __init__(self, http: HttpClient, registry: BackendRegistry, config: RouterConfig):
        self._http = http
        self._registry = registry
        self._config = config
        self._slots: dict[str, ServiceSlots] = {}
        self._targets: dict[str, int] = {}

    def slots(self, service: ServiceConfig) -> ServiceSlots:
        """The service's queue and slots (made on first use; follows config reloads)."""
        name = service.name
        self._targets[name] = service.target_concurrency
        slots = self._slots.get(name)
        if slots is None:
            fairness = self._config.fairness
            fair = service.queueing == "fair"  # read once: the queue keeps its order
            queue: FairQueue[Waiter] = FairQueue(fair, fairness.batch_every)
            slots = ServiceSlots(name, self._registry, queue, lambda: self._targets[name])
            self._slots[name] = slots
        return slots

    async def forward(
        self, sink: ResponseSink, service: ServiceConfig, head: RequestHead, body: bytes | Upload
    ) -> None:
        """Forward to a backend with a free slot; until one answers, wait in the fair queue
        (up to `queue_timeout` from arrival) and, after a failed attempt, try again.

        Only a response that has started can fail: then it ends with an explicit error.
        """
        check_endpoint(service, head)
        common = backend_headers(head.headers, None)  # validated before waiting for a backend
        name = service.name
        arrival = time.monotonic()
        self._registry.note_arrival(name, arrival)
        ticket = ticket_of(head.caller, self._config.fairness, arrival)
        if isinstance(body, bytes):  # an upload is multipart, passed on as it is
            body = with_priority(body, ticket.klass, service)
        slots = self.slots(service)
        self._check_room(slots, ticket)
        deadline = arrival + self._config.queue_timeout
        failed = False
        while True:
            backend = await slots.acquire(ticket, deadline)
            if backend is None:
                raise self._gave_up(slots, failed)
            try:
                headers = with_key(common, backend.api_key)  # each its own key
                complete = await self._exchange(sink, backend, head, headers, body)
            except Unreachable as error:
                retry_at = time.monotonic() + retry_delay(backend.failures + 1)
                self._registry.note_failure(backend, retry_at)
                if isinstance(body, Upload) and body.started:
                    raise _upload_failed(backend, name, error) from None
                log.warning(
                    "backend %s of %s failed before answering (retrying): %s",
                    backend.job_id,
                    name,
                    error,
                )
                failed = True
                continue
            finally:
                slots.release(backend)
            backend.served += complete
            return

    def _check_room(self, slots: ServiceSlots, ticket: Ticket) -> None:
        """Refuse at once when the service's queue, or this user's part of it, is full."""
        fairness, name = self._config.fairness, slots.name
        if slots.queue.waiting(ticket.flow) >= fairness.max_queue_per_user:
            wait = retry_after(slots.expected_wait(time.monotonic()))
            message = (
                f"you have {fairness.max_queue_per_user} requests waiting for {name}: "
                f"wait for their answers (about {wait} s) before sending more"
            )
            raise Rejection(429, "too_many_waiting", message, str(wait))
        if queue_is_full(self._registry.queued(name), self._config.max_queue):
            wait = retry_after(slots.expected_wait(time.monotonic()))
            message = f"{name} is busy: too many requests wait for it; retry in about {wait} s"
            raise Rejection(503, "queue_full", message, str(wait))

    def _gave_up(self, slots: ServiceSlots, failed: bool) -> Rejection:
        name = slots.name
        waited = f"{self._config.queue_timeout:.0f} s"
        ready = self._registry.ready(name)
        if failed or any(b.failures for b in ready):
            message = f"no instance of {name} answered within {waited}, retry later"
            return Rejection(503, "backend_unavailable", message, RETRY_AFTER_NOT_READY)
        if not ready:
            return self._loading(name, waited)
        wait = retry_after(slots.expected_wait(time.monotonic()))
        message = f"{name} is busy: no slot became free within {waited}; retry in about {wait} s"
        return Rejection(503, "model_busy", message, str(wait))

    def _loading(self, name: str, waited: str) -> Rejection:
        """No instance yet: Retry-After from the scheduler's predicted wait (Slurm's
        expected start plus the load time), the constant when it has none."""
        predicted = self._registry.predicted_wait(name, time.monotonic())
        message = f"{name} is starting: no instance became ready within {waited}"
        if predicted is None:
            return Rejection(503, "model_loading", f"{message}, retry later", RETRY_AFTER_NOT_READY)
        wait = retry_after(predicted)
        message = f"{message}, retry later: an instance is expected in about {wait} s"
        return Rejection(503, "model_loading", message, str(wait))

    async def _exchange(
        self,
        sink: ResponseSink,
        backend: Backend,
        head: RequestHead,
        headers: list[tuple[str, str]],
        body: bytes | Upload,
    ) -> bool:
        """Pass the backend's answer on; True if it arrived whole."""
        if isinstance(body, Upload) and body.failure is not None:
            raise body.failure  # refused (413) while it waited for a backend: not sent
        try:
            async with asyncio.timeout(self._config.first_byte_timeout) as budget:
                sent: Body = (
                    body if isinstance(body, bytes) else BodyStream(self._paced(body, budget))
                )
                tls = pinned_context(backend.certificate) if backend.certificate else None
                response = await self._http.send(
                    backend.url, head.method, head.path, headers, sent, tls=tls
                )
        except (ConnectFailed, NoResponse) as error:
            raise Unreachable(str(error)) from error
        except TimeoutError:
            if isinstance(body, Upload) and not body.ended and not body.held:
                idle = f"{self._config.idle_timeout:.0f} s"  # the client, not the model
                raise Rejection(
                    408, "upload_stalled", f"the upload sent nothing for {idle}"
                ) from None
            raise Rejection(504, "backend_timeout", "the model did not answer in time") from None
        self._registry.note_answered(backend)
        try:
            headers, event_stream = response_headers(response.headers)
            sink.start(response.status, headers)
            return await self._pass_body(sink, response, event_stream)
        finally:
            self._http.release(response)

    async def _paced(self, upload: Upload, budget: asyncio.Timeout) -> AsyncIterator[bytes]:
        """An upload's pieces as they arrive. The first-byte timeout starts after the last
        piece; until then the next piece must come, and the backend take the last one,
        within `idle_timeout` (a stalled upload or backend ends the request)."""
        loop = asyncio.get_running_loop()
        async for piece in upload.pieces():
            budget.reschedule(loop.time() + self._config.idle_timeout)
            yield piece
        budget.reschedule(loop.time() + self._config.first_byte_timeout)

    async def _pass_body(
        self, sink: ResponseSink, response: HttpResponse, event_stream: bool
    ) -> bool:
        idle = self._config.idle_timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + idle
        try:
            while True:
                chunks = response.received()
                if chunks:
                    for chunk in chunks:  # a slow client is back-pressure, not idleness
                        await sink.send(chunk)
                    deadline = loop.time() + idle
                if response.complete:
                    break
                async with asyncio.timeout_at(deadline):  # only while the backend is awaited
                    await response.receive()
        except TimeoutError:
            await self._break(sink, event_stream, f"the model sent nothing for {idle:.0f} s")
            return False
        except ResponseBroken as error:
            await self._break(sink, event_stream, f"the model's stream broke: {error}")
            return False
        sink.finish()
        return True

    async def _break(self, sink: ResponseSink, event_stream: bool, message: str) -> None:
        """End a started response with an explicit error, never a silent truncation."""
        log.warning("a backend response broke off: %s", message)
        if event_stream:
            event = {"object": "error", **json.loads(error_body(message, "upstream_error", 502))}
            await sink.send(b"data: " + json.dumps(event).encode() + b"\n\n")
            sink.finish()
        else:
            sink.fail(502, "upstream_error", message)
