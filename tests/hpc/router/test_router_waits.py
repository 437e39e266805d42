"""Requests wait out a backend's replacement (issue 9): the Forwarder against fake backends.

Fast tests at the seam `Forwarder(HttpClient, BackendRegistry, RouterConfig)`: the backends
are tiny asyncio servers on 127.0.0.1 that answer, close the connection before answering
(a server that died with the request), or break a stream off; a dead one is a port with no
listener. The real-chain version of the same faults is tests/faults/.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from hpc.config import RouterConfig, ServiceConfig
from hpc.registry import Backend, BackendRegistry
from hpc.router.forwarding import Forwarder, Rejection
from saia.base.http11 import HttpClient
from saia.base.protocol import RequestHead
from saia.sandbox.process import free_port
from tests.hpc.helpers import until

MODEL = "wait-model"
SERVICE = ServiceConfig(name=MODEL, model=MODEL)
HEAD = RequestHead(MODEL, "POST", "/v1/chat/completions", [("content-type", "application/json")])
BODY = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode()
ANSWER = b'{"object": "chat.completion"}'


@dataclass
class Sink:
    """A ResponseSink that records what the client would get."""

    status: int | None = None
    body: bytearray = field(default_factory=bytearray)
    finished: bool = False
    failed: tuple[int, str] | None = None

    def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        assert self.status is None, "a response may start only once"
        self.status = status

    async def send(self, data: bytes) -> None:
        self.body += data

    def finish(self) -> None:
        self.finished = True

    def fail(self, status: int, code: str, message: str) -> None:
        self.failed = (status, code)


@dataclass
class FakeBackend:
    """A backend on 127.0.0.1: `mode` is answer, close (after reading the request) or break
    (the head of an event stream, one event, then the connection drops)."""

    mode: str
    port: int = 0
    connections: int = 0
    server: asyncio.Server | None = None
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
                if self.mode == "close":
                    return
                if self.mode == "break":
                    writer.write(
                        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                        b"transfer-encoding: chunked\r\n\r\n"
                    )
                    event = b'data: {"choices": []}\n\n'
                    writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                    await writer.drain()
                    return
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(ANSWER), ANSWER)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def fake_backend(mode: str) -> AsyncIterator[FakeBackend]:
    backend = FakeBackend(mode)
    backend.server = await asyncio.start_server(backend.handle, "127.0.0.1", 0)
    backend.port = backend.server.sockets[0].getsockname()[1]
    try:
        yield backend
    finally:
        backend.server.close()
        for writer in backend.writers:  # ends the handlers of kept-alive connections
            writer.close()
        await backend.server.wait_closed()


@contextlib.asynccontextmanager
async def forwarder(**router: float) -> AsyncIterator[tuple[Forwarder, BackendRegistry]]:
    registry = BackendRegistry()
    async with HttpClient(connect_timeout=2.0) as http:
        yield Forwarder(http, registry, RouterConfig(**router)), registry


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


async def forward(fwd: Forwarder) -> Sink:
    sink = Sink()
    async with asyncio.timeout(30):
        await fwd.forward(sink, SERVICE, HEAD, BODY)
    return sink


async def test_a_dead_only_backend_is_waited_out_until_its_replacement_answers() -> None:
    async with forwarder(queue_timeout=30) as (fwd, registry), fake_backend("answer") as fresh:
        registry.publish(MODEL, [Backend(MODEL, "dead", dead_url())])
        waiting = [asyncio.create_task(forward(fwd)) for _ in range(20)]
        await until(lambda: registry.queued(MODEL) == 20, 10, "not all waiting", poll_s=0.01)
        assert not any(task.done() for task in waiting)
        registry.publish(MODEL, [Backend(MODEL, "fresh", fresh.url)])  # the replacement
        sinks = await asyncio.gather(*waiting)
    assert [(s.status, s.finished, bytes(s.body)) for s in sinks] == [(200, True, ANSWER)] * 20
    assert registry.queued(MODEL) == 0


async def test_a_backend_that_dies_holding_the_request_is_retried_on_the_replacement() -> None:
    async with (
        forwarder(queue_timeout=30) as (fwd, registry),
        fake_backend("close") as dying,
        fake_backend("answer") as fresh,
    ):
        registry.publish(MODEL, [Backend(MODEL, "dying", dying.url)])
        waiting = asyncio.create_task(forward(fwd))
        await until(
            lambda: dying.connections and registry.queued(MODEL), 10, "not waiting", poll_s=0.01
        )
        registry.publish(MODEL, [Backend(MODEL, "fresh", fresh.url)])
        sink = await waiting
        assert (sink.status, sink.finished, sink.failed) == (200, True, None)
        assert registry.wakeup.is_set()  # the scheduler was told to look at once


async def test_only_a_stream_whose_backend_broke_fails_and_only_answers_count_as_served() -> None:
    async with (
        forwarder() as (fwd, registry),
        fake_backend("break") as breaking,
        fake_backend("answer") as good,
    ):
        broken_backend = Backend(MODEL, "a-breaks", breaking.url)
        registry.publish(MODEL, [broken_backend])
        broken = await forward(fwd)
        assert broken.status == 200 and broken.finished  # ended with an explicit error event
        assert b'"object": "error"' in broken.body
        assert breaking.connections == 1  # a started stream is never sent again
        dead = Backend(MODEL, "a-dead", dead_url())  # picked first: the least load
        live = Backend(MODEL, "b-live", good.url, in_flight=1)
        registry.publish(MODEL, [dead, live])
        answered = await forward(fwd)
        assert (answered.status, bytes(answered.body)) == (200, ANSWER)
    assert (broken_backend.served, dead.served, live.served) == (0, 0, 1)
    assert (dead.failures, live.failures) == (1, 0)


async def test_a_backend_that_stays_dead_costs_few_attempts_and_ends_in_503() -> None:
    async with forwarder(queue_timeout=1.5) as (fwd, registry), fake_backend("close") as dead:
        registry.publish(MODEL, [Backend(MODEL, "dead", dead.url)])
        results = await asyncio.gather(*(forward(fwd) for _ in range(30)), return_exceptions=True)
    assert all(isinstance(r, Rejection) for r in results), results
    codes = {(r.status, r.code, r.retry_after) for r in results if isinstance(r, Rejection)}
    assert codes == {(503, "backend_unavailable", "30")}
    # 30 first attempts at most, then one trial at a time per back-off (0.25, 0.5, 1 s)
    assert dead.connections <= 30 + 5


async def test_a_backend_that_answers_again_takes_requests_again() -> None:
    async with forwarder(queue_timeout=10) as (fwd, registry), fake_backend("answer") as good:
        flaky = Backend(MODEL, "flaky", good.url, failures=3, retry_at=0.0)  # back-off over
        registry.publish(MODEL, [flaky])
        sink = await forward(fwd)
        assert sink.status == 200
        assert (flaky.failures, flaky.served) == (0, 1)


@pytest.mark.parametrize("queue_timeout", [0.0, 0.3])
async def test_no_backend_at_all_still_ends_in_model_loading(queue_timeout: float) -> None:
    async with forwarder(queue_timeout=queue_timeout) as (fwd, registry):
        with pytest.raises(Rejection) as rejected:
            await forward(fwd)
        assert (rejected.value.status, rejected.value.code) == (503, "model_loading")
        assert registry.demand_since(MODEL) is not None or queue_timeout == 0


def test_an_unpublished_backend_keeps_counting_its_open_requests() -> None:
    """The scheduler drains an unhealthy job with requests in flight and cancels it once
    idle: the registry must not forget those requests when the job is no longer published."""
    registry = BackendRegistry()
    leaving = Backend(MODEL, "leaving", "http://127.0.0.1:1")
    registry.publish(MODEL, [leaving])
    leaving.in_flight = 2
    registry.publish(MODEL, [])  # unhealthy: no longer published
    assert registry.in_flight_of(MODEL, "leaving") == 2
    assert registry.load(MODEL, 0.0).in_flight == 2
    assert registry.ready(MODEL) == []  # takes no new request
    leaving.in_flight = 0
    registry.publish(MODEL, [])
    assert registry.in_flight_of(MODEL, "leaving") == 0
    assert registry.load(MODEL, 0.0).in_flight == 0
