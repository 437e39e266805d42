"""The agent's request server: hop channels from the relay in, backend requests out.

`serve_requests()` listens on `<state_dir>/agent.sock` (mode 0600). Each connection is one
relay, i.e. one SSH channel from the hub, carrying many concurrent streams. A request is
checked against an allow-list of methods and paths and a known service, then forwarded by
`hpc.router.forwarding.Forwarder`; model listings and the live service state are answered here.
A CANCEL frame or a lost connection cancels the stream's task, which closes its backend
request.

Each connection is a `hpc.router.session.Session`, which bounds what the hub can make
the agent hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cloud_interface.relay import SOCKET_NAME  # one name: the relay connects to it
from hpc.batch.manager import PREFIX as BATCH_PREFIX
from hpc.batch.manager import BatchManager
from hpc.config import AgentConfig
from hpc.registry import BackendRegistry
from hpc.router import tracing
from hpc.router.forwarding import FORWARDED, Forwarder, Rejection
from hpc.router.policy import ServiceCounts, service_demand, service_status
from hpc.router.session import JSON_HEADERS, MAX_STREAMS, MIN_BODY_BUDGET, Session, StreamSink
from hpc.router.upload import Upload
from saia.base import protocol as wire
from saia.base.http11 import HttpClient
from saia.base.mux import Channel

log = logging.getLogger(__name__)

HELLO_TIMEOUT = 10.0
RETIRE_POLL = 0.1  # how often a retiring router looks for idle connections
MODELS_PATH = "/v1/models"
SERVICES_PATH = "/saia/services"


class Router:
    """Owns the listening socket's connections; one per relay."""

    def __init__(
        self, config: Callable[[], AgentConfig], registry: BackendRegistry, forwarder: Forwarder
    ):
        self._config = config  # the agent's current config: a reload changes the services
        self.registry = registry
        self.forwarder = forwarder
        self.batches = BatchManager(config)  # the reserved paths /saia/batches/... (issue 14)
        self.created = int(time.time())
        self._connections: set[asyncio.Task[Any]] = set()
        self._closing = False
        self.max_streams = MAX_STREAMS  # per connection (tests lower these two)
        self.min_budget = MIN_BODY_BUDGET
        self.retiring = False  # stopping: finish the streams in flight, refuse new ones
        self._channels: dict[asyncio.Task[Any], Channel] = {}

    @property
    def config(self) -> AgentConfig:
        return self._config()

    async def handle_connection(self, reader: asyncio.StreamReader, writer: Any) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        channel = self._channels[task] = Channel(reader, writer)
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
            self._channels.pop(task, None)

    async def retire(self, grace: float) -> None:
        """Hand over to the next agent: refuse new streams (the hub sends them again on a
        new connection, to the next agent), close each connection once its streams are
        done, and return when none is left or after `grace` seconds."""
        self.retiring = self._closing = True
        deadline = time.monotonic() + grace
        while self._connections and time.monotonic() < deadline:
            for task in list(self._connections):
                if not self._channels[task].streams:
                    task.cancel()  # idle: a request racing this is retried by the hub
            await asyncio.sleep(RETIRE_POLL)
        if self._connections:
            log.warning("cutting %d connection(s) after %.0f s", len(self._connections), grace)

    async def close(self) -> None:
        self._closing = True
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def answer(self, sink: StreamSink, head: wire.RequestHead, body: bytes | Upload) -> None:
        path, method = head.path, head.method
        if path.startswith(BATCH_PREFIX) and not head.service and isinstance(body, bytes):
            await self.batches.answer(sink, head, body)
            return
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
        with tracing.request(head, sink) as traced:  # the sink itself unless tracing is on
            await self.forwarder.forward(traced, service, head, body)

    def listing(self, only: str) -> bytes:
        services = self.config.services
        if only:
            service = self.config.service(only)
            if service is None:
                raise Rejection(404, "model_not_found", f"model {only[:200]!r} is not served")
            services = [service]
        data = [entry for s in services for entry in self.entries(s)]
        if only:
            data = [entry for entry in data if entry["id"] == only] or data[:1]
        return json.dumps({"object": "list", "data": data}).encode()

    def entries(self, service: Any) -> list[dict[str, Any]]:
        """The service's model, then each of its LoRA adapters as its own model id (with
        the base's state: the same backends serve it), `parent` naming the base as vLLM's
        own listing does."""
        base = self.describe(service)
        adapters = [
            {**base, "id": name, "name": name, "parent": service.model_id}
            for name in service.adapters
        ]
        return [base, *adapters]

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
        entry = {
            "id": service.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "saia",
            "name": service.display_name or service.model_id,
            "status": service_status(counts),
            "demand": service_demand(counts),
            "queued": counts.queued,  # waiting in the router's queue, and the longest wait
            "oldest_wait": round(registry.oldest_wait(name, time.monotonic()), 1),
            "instances": counts.ready,  # backends ready now, and jobs on their way up
            "starting": counts.starting,
            "input": list(service.input),
            "output": list(service.output),
            "endpoints": list(service.served_endpoints),
        }
        predicted = registry.predicted_wait(name, time.monotonic())
        if entry["status"] == "loading" and predicted is not None:
            entry["predicted_wait"] = round(predicted)  # seconds until an instance serves
        return entry


def unlink_if_ours(path: Path, inode: int) -> None:
    """Remove the socket file only if it is still the one this process bound."""
    with contextlib.suppress(OSError):
        if path.stat().st_ino == inode:
            path.unlink()


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
    config: AgentConfig | Callable[[], AgentConfig],
    registry: BackendRegistry,
    retire_grace: float = 0.0,
) -> None:
    """Serve hop channels on `<state_dir>/agent.sock` until cancelled; then, with
    `retire_grace`, finish the streams in flight (`Router.retire`) before closing.

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
        ours = path.stat().st_ino
        log.info("router listening on %s", path)
        try:
            await asyncio.Event().wait()
        finally:
            server.close()
            unlink_if_ours(path, ours)  # the next agent may have bound it already
            try:
                if retire_grace:
                    await router.retire(retire_grace)
            finally:
                await router.close()
