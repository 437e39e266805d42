"""Forwarding one routed request to a backend model server, streaming the answer back.

The router hands over a validated request and a `ResponseSink`; this module picks a backend
(waiting for one when none is ready), keeps the registry's load counters, and never loses a
request to a backend that dies before answering: the request waits (bounded by
`queue_timeout`) for a ready backend, e.g. the dead one's replacement, and is sent there.
A break after the response started ends with an OpenAI-style error event, never a silent
truncation.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections import defaultdict
from typing import Protocol

from hpc.config import RouterConfig, ServiceConfig
from hpc.registry import Backend, BackendRegistry
from hpc.router.policy import next_trial, pick_backend, queue_is_full, retry_delay
from saia.base.http11 import ConnectFailed, HttpClient, HttpResponse, NoResponse, ResponseBroken
from saia.base.protocol import RequestHead

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
RETRY_AFTER_QUEUE_FULL = "5"
RETRY_AFTER_NOT_READY = "30"


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
    """Sends requests to the registry's backends over the router's keep-alive client."""

    def __init__(self, http: HttpClient, registry: BackendRegistry, config: RouterConfig):
        self._http = http
        self._registry = registry
        self._config = config
        self._turns: defaultdict[str, int] = defaultdict(int)

    async def forward(
        self, sink: ResponseSink, service: ServiceConfig, head: RequestHead, body: bytes
    ) -> None:
        """Forward to a ready backend; until one answers, wait (up to `queue_timeout` from
        arrival) for one to become ready or for a failed one's next trial, and try again.

        Only a response that has started can fail: then it ends with an explicit error.
        """
        common = backend_headers(head.headers, None)  # validated before waiting for a backend
        name = service.name
        arrival = time.monotonic()
        self._registry.note_arrival(name, arrival)
        deadline = arrival + self._config.queue_timeout
        failed = False
        while True:
            backend = await self._acquire(name, deadline, failed)
            headers = with_key(common, backend.api_key)  # each its own key
            backend.in_flight += 1
            try:
                complete = await self._exchange(sink, backend, head, headers, body)
            except Unreachable as error:
                log.warning(
                    "backend %s of %s failed before answering (retrying): %s",
                    backend.job_id,
                    name,
                    error,
                )
                retry_at = time.monotonic() + retry_delay(backend.failures + 1)
                self._registry.note_failure(backend, retry_at)
                failed = True
                continue
            finally:
                backend.in_flight -= 1
            backend.served += complete
            return

    async def _acquire(self, name: str, deadline: float, failed: bool) -> Backend:
        """A backend that may take the request now, waiting (bounded) until there is one."""
        registry = self._registry
        waited = False
        while True:
            now = time.monotonic()
            ready = registry.ready(name)
            job_id = pick_backend(ready, self._turns[name], now)
            if job_id is not None:
                self._turns[name] += 1
                backend = next(b for b in ready if b.job_id == job_id)
                if backend.failures:  # a trial: others skip it until it answers or fails
                    backend.retry_at = now + retry_delay(backend.failures)
                return backend
            if not waited and queue_is_full(registry.queued(name), self._config.max_queue):
                raise Rejection(
                    503, "queue_full", f"too many requests wait for {name}", RETRY_AFTER_QUEUE_FULL
                )
            if now >= deadline:
                raise self._gave_up(name, failed)
            registry.note_demand(name, now)
            waited = True
            wake = min(deadline, next_trial(ready, now) or deadline)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wake - now):
                    await registry.wait_change(name)

    def _gave_up(self, name: str, failed: bool) -> Rejection:
        waited = f"{self._config.queue_timeout:.0f} s"
        if failed:
            message = f"no instance of {name} answered within {waited}, retry later"
            return Rejection(503, "backend_unavailable", message, RETRY_AFTER_NOT_READY)
        message = f"{name} is starting: no instance became ready within {waited}, retry later"
        return Rejection(503, "model_loading", message, RETRY_AFTER_NOT_READY)

    async def _exchange(
        self,
        sink: ResponseSink,
        backend: Backend,
        head: RequestHead,
        headers: list[tuple[str, str]],
        body: bytes,
    ) -> bool:
        """Pass the backend's answer on; True if it arrived whole."""
        try:
            async with asyncio.timeout(self._config.first_byte_timeout):
                response = await self._http.send(backend.url, head.method, head.path, headers, body)
        except (ConnectFailed, NoResponse) as error:
            raise Unreachable(str(error)) from error
        except TimeoutError:
            raise Rejection(504, "backend_timeout", "the model did not answer in time") from None
        self._registry.note_answered(backend)
        try:
            headers, event_stream = response_headers(response.headers)
            sink.start(response.status, headers)
            return await self._pass_body(sink, response, event_stream)
        finally:
            self._http.release(response)

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
