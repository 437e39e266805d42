"""The agent's router session against a buggy or compromised hub, on a socketpair: its
memory stays within the stated budget whatever the hub sends (issue 9 item 4).

The forwarder is replaced at its seam (`Router.forwarder`) by one that answers with the
size of the body it got, so no backend is needed and every answer is checkable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest

from hpc.config import AgentConfig, RouterConfig, ServiceConfig
from hpc.registry import BackendRegistry
from hpc.router import server
from hpc.router.forwarding import Forwarder
from hpc.router.server import Router
from hpc.router.session import HEAD_COST, PAIR_COST, Session, StreamSink
from saia.base import mux
from saia.base import protocol as wire
from tests.hpc.helpers import until

MODEL = "hostile-model"
CHAT = "/v1/chat/completions"
MiB = 1024 * 1024


class SizeForwarder:
    """At the forwarder's seam: answers 200 with the number of body bytes it got."""

    async def forward(
        self, sink: StreamSink, service: Any, head: wire.RequestHead, body: bytes
    ) -> None:
        await sink.reply(200, json.dumps({"bytes": len(body)}).encode(), [])


class Recording(Session):
    """A Session that checks its bounds after every frame it handles."""

    made: list[Recording] = []
    peak_held = 0
    peak_streams = 0

    def __init__(self, router: Any, channel: mux.Channel) -> None:
        super().__init__(router, channel)
        Recording.made.append(self)

    def dispatch(self, frame: wire.Frame) -> None:
        super().dispatch(frame)
        Recording.peak_held = max(Recording.peak_held, self.held)
        Recording.peak_streams = max(Recording.peak_streams, len(self.channel.streams))
        assert self.held <= self.budget
        assert len(self.channel.streams) <= self.router.max_streams


@pytest.fixture(autouse=True)
def recording(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(server, "Session", Recording)
    Recording.made, Recording.peak_held, Recording.peak_streams = [], 0, 0
    yield


def make_router(
    tmp_path: Path, *, streams: int, budget: int, max_body: int = 1024 * 1024
) -> Router:
    config = AgentConfig(
        state_dir=tmp_path,
        services=[ServiceConfig(name=MODEL, model=MODEL)],
        router=RouterConfig(max_body_bytes=max_body),
    )
    router = Router(lambda: config, BackendRegistry(), cast(Forwarder, SizeForwarder()))
    router.max_streams, router.min_budget = streams, budget
    return router


@dataclass
class Hub:
    """The hub's end of one connection, writing raw frames and collecting the answers."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    task: asyncio.Task[None]
    frames: dict[int, list[wire.Frame]] = field(default_factory=dict)
    closed: bool = False

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def answer(self, stream: int) -> tuple[int, dict[str, Any]] | None:
        """(status, JSON body) of a complete answer, or None."""
        got = self.frames.get(stream, [])
        if not got or got[-1].type not in (wire.END, wire.ERROR):
            return None
        if got[0].type == wire.ERROR:
            return wire.parse_error(got[0].payload).status, {}
        body = b"".join(f.payload for f in got if f.type == wire.DATA)
        return wire.parse_response(got[0].payload).status, json.loads(body)

    async def read(self) -> None:
        """Collect frames until EOF (stream 0 holds a channel-wide ERROR)."""
        decoder = wire.FrameDecoder()
        try:
            while data := await self.reader.read(1 << 20):
                for frame in decoder.feed(data):
                    if frame.type not in (wire.WINDOW, wire.PONG, wire.HELLO):
                        self.frames.setdefault(frame.stream, []).append(frame)
        except ConnectionResetError:
            pass  # closed with our bytes unread: the kernel resets the connection
        self.closed = True


@contextlib.asynccontextmanager
async def connect(router: Router) -> AsyncIterator[Hub]:
    theirs, ours = socket.socketpair()
    reader, writer = await asyncio.open_unix_connection(sock=theirs)
    task = asyncio.create_task(router.handle_connection(reader, writer))
    hub_reader, hub_writer = await asyncio.open_unix_connection(sock=ours)
    hub = Hub(hub_reader, hub_writer, task)
    hub.send(wire.encode_hello())
    reading = asyncio.create_task(hub.read())
    try:
        yield hub
    finally:
        hub_writer.close()
        reading.cancel()
        task.cancel()
        await asyncio.gather(reading, task, return_exceptions=True)


def request(stream: int, path: str = CHAT, headers: list[tuple[str, str]] | None = None) -> bytes:
    return wire.encode_request(stream, wire.RequestHead(MODEL, "POST", path, headers or []))


def data(stream: int, size: int) -> bytes:
    chunks = [min(wire.MAX_DATA, size - at) for at in range(0, size, wire.MAX_DATA)]
    return b"".join(wire.encode_data(stream, b"b" * n) for n in chunks)


async def test_requests_without_end_are_capped_at_request(tmp_path: Path) -> None:
    router = make_router(tmp_path, streams=256, budget=64 * MiB)
    async with connect(router) as hub:
        hub.send(b"".join(request(2 * i + 1) for i in range(1000)))  # never an END
        refused = range(2 * 256 + 1, 2000, 2)
        await until(lambda: all(hub.answer(s) for s in refused), 30, "excess not refused")
        assert {hub.answer(s)[0] for s in refused} == {503}  # type: ignore[index]
        assert Recording.peak_streams == 256
        # The open ones are still served once they end.
        hub.send(wire.encode_end(1) + wire.encode_end(511))
        await until(lambda: hub.answer(1) and hub.answer(511), 10, "open streams not served")
        assert hub.answer(1) == (200, {"bytes": 0})


async def test_large_heads_without_end_stay_within_the_budget(tmp_path: Path) -> None:
    budget = 8 * MiB
    router = make_router(tmp_path, streams=4096, budget=budget)
    headers = [(f"x-h{i}", "v" * 250) for i in range(120)]  # a ~32 KiB head
    tracemalloc.start()
    try:
        async with connect(router) as hub:
            for stream in range(1, 2000, 2):  # 1000 heads of 32 KiB, never an END
                hub.send(request(stream, headers=headers))
                await hub.writer.drain()
            await until(lambda: hub.answer(1999), 60, "the last head not answered")
            _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert Recording.peak_held <= budget
    cost = len(request(1, headers=headers)) - 10 + HEAD_COST + PAIR_COST * len(headers)
    held_streams = Recording.peak_held // cost
    assert 0 < held_streams < 1000
    # The heads held (measured: 8.4 MB charged, 9.9 MB peak), plus reads in flight.
    assert peak < budget + 4 * MiB


async def test_many_streams_within_their_initial_windows_stay_within_the_budget(
    tmp_path: Path,
) -> None:
    budget = 16 * MiB
    router = make_router(tmp_path, streams=4096, budget=budget, max_body=2 * MiB)
    async with connect(router) as hub:
        streams = [2 * i + 1 for i in range(40)]  # 40 x 1 MiB (each within its window)
        for stream in streams:
            hub.send(request(stream) + data(stream, wire.INITIAL_WINDOW))
        await until(lambda: hub.writer.transport.get_write_buffer_size() == 0, 30, "unread")
        hub.send(b"".join(wire.encode_end(s) for s in streams))
        await until(lambda: all(hub.answer(s) for s in streams), 30, "not all answered")
        answers = [hub.answer(s) for s in streams]
        served = [a for a in answers if a == (200, {"bytes": wire.INITIAL_WINDOW})]
        refused = [a for a in answers if a is not None and a[0] == 503]
        assert len(served) + len(refused) == len(streams)
        assert 0 < len(served) <= budget // wire.INITIAL_WINDOW
        assert refused[0][1]["error"]["code"] == "agent_busy"
        assert Recording.peak_held <= budget
        await until(lambda: Recording.made[0].held == 0, 10, "bodies not released")


PING = wire.encode_frame(wire.PING, 0, b"p" * 8)
REFUSED = b"".join(wire.encode_frame(wire.REQUEST, 2 * i + 3, b"{}") for i in range(200_000))


@pytest.mark.parametrize(
    ("flood", "answers_per_read"),
    [(PING * 300_000, mux.READ_SIZE), (REFUSED, 0)],  # a refusal: 20 times its REQUEST
    ids=["pings", "excess-streams"],
)
async def test_a_flood_of_answers_the_hub_never_reads_pauses_the_session(
    tmp_path: Path, flood: bytes, answers_per_read: int
) -> None:
    router = make_router(tmp_path, streams=1, budget=MiB)
    theirs, ours = socket.socketpair()
    reader, writer = await asyncio.open_unix_connection(sock=theirs)
    task = asyncio.create_task(router.handle_connection(reader, writer))
    _, hub_writer = await asyncio.open_unix_connection(sock=ours)
    try:
        hub_writer.write(wire.encode_hello() + request(1) + flood)
        # Refusals are checked after each one: at most one (240 bytes) past the queue.
        bound = 64 * 1024 + mux.CONTROL_QUEUE + answers_per_read + 1024
        await until(lambda: Recording.made and Recording.made[0].channel.stalled, 30, "no stall")
        assert writer.transport.get_write_buffer_size() <= bound
    finally:
        hub_writer.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_concurrent_uploads_past_half_the_budget_all_complete(tmp_path: Path) -> None:
    """Withheld credit never stalls every upload at once (the oldest one goes on)."""
    router = make_router(tmp_path, streams=64, budget=0, max_body=4 * MiB)  # budget 16 MiB
    theirs, ours = socket.socketpair()
    reader, writer = await asyncio.open_unix_connection(sock=theirs)
    task = asyncio.create_task(router.handle_connection(reader, writer))
    hub = mux.Channel(*await asyncio.open_unix_connection(sock=ours))
    hub.send(wire.encode_hello())
    assert await hub.read_hello() == wire.VERSION
    size = 4 * MiB - 4096  # four windows each: credit must come back, more than once

    async def upload(stream: int) -> mux.StreamState:
        state = hub.open(stream)
        hub.send(request(stream))
        await hub.send_data(state, b"u" * size)
        hub.send(wire.encode_end(stream))
        return state

    async def deliver() -> None:
        while (frames := await hub.next_frames()) is not None:
            for frame in frames:
                if (state := hub.streams.get(frame.stream)) is not None:
                    state.inbox.put_nowait(frame)

    delivering = asyncio.create_task(deliver())
    try:
        async with asyncio.timeout(30):
            states = await asyncio.gather(*(upload(2 * i + 1) for i in range(3)))
            for state in states:
                head = await state.inbox.get()
                assert isinstance(head, wire.Frame) and head.type == wire.RESPONSE
                assert wire.parse_response(head.payload).status == 200
                body = await state.inbox.get()
                assert isinstance(body, wire.Frame)
                assert json.loads(body.payload) == {"bytes": size}
        assert Recording.peak_held <= Recording.made[0].budget
    finally:
        delivering.cancel()
        hub.close()
        task.cancel()
        await asyncio.gather(task, delivering, return_exceptions=True)
