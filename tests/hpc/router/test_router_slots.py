"""Requests wait in the router's fair queue, not in a backend (issue 11): the Forwarder at its
seam against a real HTTP server on 127.0.0.1 that holds each request until released.

The real chain (hub, sshd, relay, agent, Slurm stand-in jobs) is tests/faults/test_fairness.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from hpc.config import RouterConfig, ServiceConfig
from hpc.registry import Backend, BackendRegistry
from hpc.router.forwarding import Forwarder, Rejection
from saia.base import protocol as wire
from saia.base.http11 import HttpClient
from saia.base.protocol import Caller, RequestHead
from tests.hpc.helpers import until
from tests.hpc.router.test_router_waits import ANSWER, BODY, MODEL, Sink

SERVICE = ServiceConfig(name=MODEL, model=MODEL, target_concurrency=2)


@dataclass
class HoldingBackend:
    """Answers each request only when `release()` lets one go; records who came in."""

    port: int = 0
    running: int = 0
    most: int = 0
    arrived: list[str] = field(default_factory=list)
    gate: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(0))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                fields = dict(
                    line.split(b": ", 1) for line in head.split(b"\r\n")[1:] if b": " in line
                )
                await reader.readexactly(int(fields[b"content-length"]))
                self.arrived.append(fields.get(b"x-user", b"?").decode())
                self.running += 1
                self.most = max(self.most, self.running)
                await self.gate.acquire()
                self.running -= 1
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(ANSWER), ANSWER)
                )
                await writer.drain()
        writer.close()

    def release(self, count: int = 1) -> None:
        for _ in range(count):
            self.gate.release()


@contextlib.asynccontextmanager
async def setup(
    **router: object,
) -> AsyncIterator[tuple[Forwarder, BackendRegistry, HoldingBackend]]:
    backend = HoldingBackend()
    server = await asyncio.start_server(backend.handle, "127.0.0.1", 0)
    backend.port = server.sockets[0].getsockname()[1]
    registry = BackendRegistry()
    registry.publish(MODEL, [Backend(MODEL, "job", backend.url)])
    try:
        async with HttpClient(connect_timeout=2.0) as http:
            yield Forwarder(http, registry, RouterConfig.model_validate(router)), registry, backend
    finally:
        backend.release(1000)
        server.close()


def send(fwd: Forwarder, user: str, priority: str = "") -> asyncio.Task[Sink]:
    head = RequestHead(
        MODEL, "POST", "/v1/chat/completions",
        [("content-type", "application/json"), ("x-user", user)],
        Caller(user=user, priority=priority),
    )  # fmt: skip

    async def run() -> Sink:
        sink = Sink()
        async with asyncio.timeout(30):
            await fwd.forward(sink, SERVICE, head, BODY)
        return sink

    return asyncio.create_task(run())


async def test_a_backend_gets_at_most_its_slots_and_the_rest_wait_in_the_router() -> None:
    async with setup() as (fwd, registry, backend):
        tasks = [send(fwd, "heavy") for _ in range(6)]
        await until(lambda: registry.queued(MODEL) == 4 and backend.running == 2, 10, "no queue")
        backend.release(6)
        sinks = await asyncio.gather(*tasks)
    assert all(s.status == 200 and bytes(s.body) == ANSWER for s in sinks)
    assert backend.most == 2 and registry.queued(MODEL) == 0
    assert registry.in_flight_of(MODEL, "job") == 0


async def test_a_backend_whose_own_queue_holds_requests_gets_fewer_slots() -> None:
    async with setup() as (fwd, registry, backend):
        # it reported 1 running and 3 waiting: more than 1 would wait inside its FIFO
        registry.publish(MODEL, [Backend(MODEL, "job", backend.url, running=1, waiting=3)])
        tasks = [send(fwd, "a") for _ in range(3)]
        await until(lambda: registry.queued(MODEL) == 2 and backend.running == 1, 10, "no cap")
        # all it was given ran with nothing waiting: one more slot
        registry.publish(MODEL, [Backend(MODEL, "job", backend.url, running=1, waiting=0)])
        await until(lambda: backend.running == 2, 10, "the cap did not grow")
        backend.release(3)
        await asyncio.gather(*tasks)
    assert backend.most == 2


async def test_a_light_user_takes_the_next_free_slot_ahead_of_a_heavy_backlog() -> None:
    async with setup() as (fwd, registry, backend):
        heavy = [send(fwd, "heavy") for _ in range(10)]
        await until(lambda: registry.queued(MODEL) == 8, 10, "heavy not queued")
        light = send(fwd, "light")
        batch = send(fwd, "nightly", priority="batch")
        await until(lambda: registry.queued(MODEL) == 10, 10, "light not queued")
        backend.release(1)
        await until(lambda: len(backend.arrived) == 3, 10, "no slot given")
        assert backend.arrived[2] == "light"  # the next free slot, not the 9th heavy one
        backend.release(100)
        await asyncio.gather(*heavy, light, batch)
    assert "nightly" in backend.arrived[3:]  # batch ran, behind interactive


async def test_a_cancelled_waiting_request_leaves_the_queue_and_never_reaches_a_backend() -> None:
    async with setup() as (fwd, registry, backend):
        running = [send(fwd, "a") for _ in range(2)]
        await until(lambda: backend.running == 2, 10, "not running")
        waiting = send(fwd, "gone")
        await until(lambda: registry.queued(MODEL) == 1, 10, "not queued")
        waiting.cancel()
        await until(lambda: registry.queued(MODEL) == 0, 10, "still queued")
        backend.release(3)
        await asyncio.gather(*running, send(fwd, "b"))
        assert backend.arrived == ["a", "a", "b"]  # "gone" never reached it
        assert registry.in_flight_of(MODEL, "job") == 0


async def test_a_wait_past_the_queue_timeout_is_503_model_busy_with_retry_after() -> None:
    async with setup(queue_timeout=0.3) as (fwd, _registry, backend):
        running = [send(fwd, "a") for _ in range(2)]
        await until(lambda: backend.running == 2, 10, "not running")
        late = send(fwd, "b")
        error = await asyncio.gather(late, return_exceptions=True)
        backend.release(2)
        await asyncio.gather(*running)
    (rejection,) = error
    assert isinstance(rejection, Rejection)
    assert (rejection.status, rejection.code) == (503, "model_busy")
    assert rejection.retry_after is not None and int(rejection.retry_after) >= 1
    assert "busy" in str(rejection)


async def test_one_users_full_share_of_the_queue_is_429_and_others_still_queue() -> None:
    async with setup(fairness={"max_queue_per_user": 3}) as (fwd, registry, backend):
        tasks = [send(fwd, "a") for _ in range(5)]  # 2 run, 3 wait
        await until(lambda: registry.queued(MODEL) == 3, 10, "not queued")
        refused = await asyncio.gather(send(fwd, "a"), return_exceptions=True)
        other = send(fwd, "b")
        await until(lambda: registry.queued(MODEL) == 4, 10, "b not queued")
        backend.release(100)
        await asyncio.gather(*tasks, other)
    (rejection,) = refused
    assert isinstance(rejection, Rejection)
    assert (rejection.status, rejection.code) == (429, "too_many_waiting")
    assert rejection.retry_after is not None


def test_the_caller_travels_in_the_hop_head_and_nothing_else_sets_it() -> None:
    head = RequestHead(MODEL, "POST", "/v1/chat/completions", [], Caller("ann", "k1", "g", "batch"))
    frame = wire.FrameDecoder().feed(wire.encode_request(1, head))[0]
    assert wire.parse_request(frame.payload) == head
    plain = RequestHead(MODEL, "POST", "/v1/chat/completions", [("x-saia-user", "mallory")])
    assert b"caller" not in wire.encode_request(1, plain)  # an older hub's head is unchanged
    assert wire.parse_request(wire.encode_request(1, plain)[10:]).caller == Caller()
    with pytest.raises(wire.ProtocolError, match="caller"):
        wire.parse_request(b'{"service": "m", "method": "POST", "path": "/", "caller": [1]}')
