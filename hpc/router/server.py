"""The agent's request server: hop channels from the relay in, backend requests out.

`serve_requests()` listens on `<state_dir>/agent.sock` (mode 0600). Each connection is one
relay, i.e. one SSH channel from the hub, carrying many concurrent streams. A request is
checked against an allow-list of methods and paths and a known service, then forwarded by
`hpc.router.forwarding.Forwarder`; model listings and the live service state are answered here.
A CANCEL frame or a lost connection cancels the stream's task, which closes its backend
request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hpc.config import AgentConfig
from hpc.registry import BackendRegistry
from hpc.router.forwarding import Forwarder, Rejection, error_body
from hpc.router.policy import ServiceCounts, service_demand, service_status
from saia.base import protocol as wire
from saia.base.http11 import HttpClient
from saia.base.mux import Channel, StreamClosed, StreamState

log = logging.getLogger(__name__)

SOCKET_NAME = "agent.sock"
HELLO_TIMEOUT = 10.0
MAX_STREAMS = 4096  # concurrent streams per channel
MIN_BODY_BUDGET = 64 * 1024 * 1024  # request bytes one connection may hold
FORWARDED = frozenset(
    {
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/embeddings"),
        ("POST", "/tokenize"),
        ("POST", "/detokenize"),
        ("POST", "/v1/score"),
        ("POST", "/v1/rerank"),
    }
)
MODELS_PATH = "/v1/models"
SERVICES_PATH = "/saia/services"
JSON_HEADERS = [("content-type", "application/json")]


class StreamSink:
    """A `ResponseSink` writing one stream's answer as frames."""

    def __init__(self, channel: Channel, state: StreamState) -> None:
        self._channel, self._state = channel, state
        self.started = False

    def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        self.started = True
        self._channel.send(wire.encode_response(self._state.id, wire.ResponseHead(status, headers)))

    async def send(self, data: bytes) -> None:
        await self._channel.send_data(self._state, data)

    def finish(self) -> None:
        self._channel.send(wire.encode_end(self._state.id))

    def fail(self, status: int, code: str, message: str) -> None:
        self._channel.send(wire.encode_error(self._state.id, status, code, message))

    async def reply(self, status: int, body: bytes, headers: list[tuple[str, str]]) -> None:
        self.start(status, headers)
        await self.send(body)
        self.finish()


class Router:
    """Owns the listening socket's connections; one per relay."""

    def __init__(
        self, config: Callable[[], AgentConfig], registry: BackendRegistry, forwarder: Forwarder
    ):
        self._config = config  # the agent's current config: a reload changes the services
        self.registry = registry
        self.forwarder = forwarder
        self.created = int(time.time())
        self._connections: set[asyncio.Task[Any]] = set()
        self._closing = False

    @property
    def config(self) -> AgentConfig:
        return self._config()

    async def handle_connection(self, reader: asyncio.StreamReader, writer: Any) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        channel = Channel(reader, writer)
        try:
            async with asyncio.timeout(HELLO_TIMEOUT):
                version = await channel.read_hello()
            if version != wire.VERSION:
                message = f"protocol version {version} is not supported (agent speaks 1)"
                channel.send(wire.encode_error(0, 400, "unsupported_version", message))
                return
            channel.send(wire.encode_hello())
            await Session(self, channel).run()
        except (wire.ProtocolError, TimeoutError) as error:
            reason = str(error) or "no HELLO in time"
            log.warning("closing a relay connection: %s", reason)
            channel.send(wire.encode_error(0, 400, "protocol_error", reason))
        except asyncio.CancelledError:
            if not self._closing:
                raise
            # Shutting down: end quietly (asyncio's server callback logs a cancelled task).
        finally:
            channel.close()
            self._connections.discard(task)

    async def close(self) -> None:
        self._closing = True
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def answer_rejection(self, sink: StreamSink, rejection: Rejection) -> None:
        """An OpenAI error JSON response (or an ERROR frame if the response started)."""
        if sink.started:
            sink.fail(rejection.status, rejection.code, str(rejection))
            return
        kind = "invalid_request_error" if rejection.status < 500 else "service_unavailable"
        headers = list(JSON_HEADERS)
        if rejection.retry_after:
            headers.append(("retry-after", rejection.retry_after))
        body = error_body(str(rejection), kind, rejection.code)
        await sink.reply(rejection.status, body, headers)

    async def answer(self, sink: StreamSink, head: wire.RequestHead, body: bytes) -> None:
        path, method = head.path, head.method
        if path in (MODELS_PATH, SERVICES_PATH):
            if method != "GET":
                raise Rejection(405, "method_not_allowed", f"use GET for {path}")
            await sink.reply(200, self.listing(head.service), JSON_HEADERS)
            return
        if (method, path) not in FORWARDED:
            raise Rejection(404, "unknown_endpoint", f"{method} {path[:200]} is not served here")
        if not head.service:
            raise Rejection(400, "model_missing", "the request names no model")
        service = self.config.service(head.service)
        if service is None:
            raise Rejection(404, "model_not_found", f"model {head.service[:200]!r} is not served")
        await self.forwarder.forward(sink, service, head, body)

    def listing(self, only: str) -> bytes:
        services = self.config.services
        if only:
            service = self.config.service(only)
            if service is None:
                raise Rejection(404, "model_not_found", f"model {only[:200]!r} is not served")
            services = [service]
        return json.dumps({"object": "list", "data": [self.describe(s) for s in services]}).encode()

    def describe(self, service: Any) -> dict[str, Any]:
        registry, name = self.registry, service.name
        counts = ServiceCounts(
            ready=len(registry.ready(name)),
            starting=registry.starting(name),
            in_flight=registry.load(name, time.monotonic()).in_flight,
            queued=registry.queued(name),
            demand_waiting=registry.demand_since(name) is not None,
            target_concurrency=service.target_concurrency,
        )
        return {
            "id": service.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "saia",
            "name": service.display_name or service.model_id,
            "status": service_status(counts),
            "demand": service_demand(counts),
            "input": list(service.input),
            "output": list(service.output),
        }


class Incoming:
    """A request stream whose body is still arriving."""

    __slots__ = ("body", "head", "state", "too_large")

    def __init__(self, state: StreamState, head: wire.RequestHead | None) -> None:
        self.state, self.head = state, head
        self.body: bytes | bytearray = b""  # a one-frame body is kept as is (no copies)
        self.too_large = False


class Session:
    """One relay connection: decodes frames and runs one task per request stream."""

    def __init__(self, router: Router, channel: Channel) -> None:
        self.router, self.channel = router, channel
        self.incoming: dict[int, Incoming] = {}
        self.last_id = 0
        self.tasks: asyncio.TaskGroup | None = None
        # Request bodies held by this connection: beyond the budget, credit is withheld
        # (the client's sends wait) until bodies are released.
        self.budget = max(MIN_BODY_BUDGET, 4 * router.config.router.max_body_bytes)
        self.buffered = 0
        self.withheld: deque[tuple[StreamState, int]] = deque()

    async def run(self) -> None:
        violation: wire.ProtocolError | None = None
        async with asyncio.TaskGroup() as tasks:
            self.tasks = tasks
            try:
                while (frames := await self.channel.next_frames()) is not None:
                    for frame in frames:
                        self.dispatch(frame)
            except wire.ProtocolError as error:  # raised after the group, not wrapped by it
                violation = error
            finally:  # the client is gone (or broke the protocol): drop its streams
                for state in list(self.channel.streams.values()):
                    if state.task is not None:
                        state.task.cancel()
        if violation is not None:
            raise violation

    def dispatch(self, frame: wire.Frame) -> None:
        kind, stream = frame.type, frame.stream
        if kind == wire.REQUEST:
            self.open(frame)
            return
        if kind not in (wire.DATA, wire.END, wire.CANCEL):
            raise wire.ProtocolError(f"a client may not send {wire.describe(frame)}")
        if stream > self.last_id:
            raise wire.ProtocolError(f"{wire.describe(frame)} on a stream never opened")
        state = self.channel.streams.get(stream)
        if state is None:
            return  # already answered or cancelled: late frames are harmless
        if kind == wire.CANCEL:
            if state.task is not None:
                state.task.cancel()
            cancelled = self.incoming.pop(stream, None)
            if cancelled is not None:
                self.release(len(cancelled.body))
            self.channel.discard(state)
        elif kind == wire.DATA:
            self.receive(state, frame.payload)
        else:
            self.start(stream)

    def open(self, frame: wire.Frame) -> None:
        if frame.stream <= self.last_id:
            raise wire.ProtocolError(f"stream id {frame.stream} reused")
        self.last_id = frame.stream
        state = self.channel.open(frame.stream)
        try:
            head: wire.RequestHead | None = wire.parse_request(frame.payload)
        except wire.ProtocolError as error:
            log.info("bad request head on stream %d: %s", frame.stream, error)
            head = None
        self.incoming[frame.stream] = Incoming(state, head)

    def receive(self, state: StreamState, data: bytes) -> None:
        incoming = self.incoming.get(state.id)
        if incoming is None:
            raise wire.ProtocolError(f"DATA after END on stream {state.id}")
        if len(incoming.body) + len(data) > self.router.config.router.max_body_bytes:
            incoming.too_large = True
            self.release(len(incoming.body))
            incoming.body = b""
        if incoming.too_large:
            self.channel.consumed(state, len(data))  # discarded at once
            return
        if not incoming.body:
            incoming.body = data
        elif isinstance(incoming.body, bytes):
            incoming.body = bytearray(incoming.body) + data
        else:
            incoming.body += data
        self.buffered += len(data)
        if self.buffered <= self.budget:
            self.channel.consumed(state, len(data))
        else:
            self.withheld.append((state, len(data)))

    def release(self, size: int) -> None:
        """A body is no longer held: return withheld credit while within the budget."""
        self.buffered -= size
        while self.withheld and self.buffered <= self.budget:
            state, withheld = self.withheld.popleft()
            self.channel.consumed(state, withheld)

    def start(self, stream: int) -> None:
        incoming = self.incoming.pop(stream, None)
        if incoming is None:
            raise wire.ProtocolError(f"second END on stream {stream}")
        assert self.tasks is not None
        incoming.state.task = self.tasks.create_task(self.serve(incoming))

    async def serve(self, incoming: Incoming) -> None:
        """One request's task: never raises (the session's other streams go on)."""
        sink = StreamSink(self.channel, incoming.state)
        try:
            try:
                await self.checked_answer(sink, incoming)
            except Rejection as rejection:
                await self.router.answer_rejection(sink, rejection)
            except (StreamClosed, asyncio.CancelledError):
                raise
            except Exception:
                log.exception("request on stream %d failed", incoming.state.id)
                failure = Rejection(500, "internal_error", "the agent failed while answering")
                await self.router.answer_rejection(sink, failure)
        except StreamClosed:
            pass
        finally:
            self.release(len(incoming.body))
            self.channel.discard(incoming.state)

    async def checked_answer(self, sink: StreamSink, incoming: Incoming) -> None:
        if incoming.head is None:
            raise Rejection(400, "bad_request", "the request head is not valid")
        if incoming.too_large:
            limit = self.router.config.router.max_body_bytes
            raise Rejection(413, "request_too_large", f"the body exceeds {limit} bytes")
        if len(self.channel.streams) > MAX_STREAMS:
            raise Rejection(503, "too_many_streams", "too many concurrent requests", "1")
        body = incoming.body
        await self.router.answer(sink, incoming.head, body if type(body) is bytes else bytes(body))


async def _listen(router: Router, path: Path) -> asyncio.AbstractServer:
    """Bind under a temporary name, restrict it to the owner, then move it in place."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    server = await asyncio.start_unix_server(
        router.handle_connection, path=str(temporary), limit=wire.MAX_DATA
    )
    os.chmod(temporary, 0o600)
    os.replace(temporary, path)
    return server


async def serve_requests(
    config: AgentConfig | Callable[[], AgentConfig], registry: BackendRegistry
) -> None:
    """Serve hop channels on `<state_dir>/agent.sock` until cancelled.

    `config` may be a function returning the current config (the agent's, which a reload
    replaces); the socket path and `router` settings are read once, at start.
    """
    current = config if callable(config) else lambda: config
    start = current()
    path = start.state_dir / SOCKET_NAME
    async with HttpClient(
        connect_timeout=start.router.connect_timeout, header_encoding="utf-8"
    ) as http:
        router = Router(current, registry, Forwarder(http, registry, start.router))
        server = await _listen(router, path)
        log.info("router listening on %s", path)
        try:
            await asyncio.Event().wait()
        finally:
            server.close()
            await router.close()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
