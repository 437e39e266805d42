"""Uploads through the agent's router session, streamed into the backend as they arrive
(`hpc.router.upload`): the hub's end is a real `saia.base.mux.Channel` on a socketpair (so
the mux's flow control paces it), the backends are small asyncio HTTP servers on
127.0.0.1 (httptools parses what they get, Content-Length or chunked, as uvicorn does).

What is held per upload stays within the stream's window whatever the body's size; a
client cancel, a backend failure mid-upload and the 413 limit end the request without a
hang, a retry after bytes were sent, or memory left held; a stream the agent refused at
its head gets credit for what the hub sends anyway (it answered 503, not a timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httptools
import pytest

from hpc.config import AgentConfig, RouterConfig, ServiceConfig
from hpc.registry import Backend, BackendRegistry
from hpc.router import server, session
from hpc.router.forwarding import Forwarder
from hpc.router.server import Router
from saia.base import protocol as wire
from saia.base.http11 import HttpClient
from saia.base.mux import Channel, Lost, StreamState
from saia.sandbox.process import free_port
from tests.hpc.helpers import until

MODEL = "listener"
AUDIO = "/v1/audio/transcriptions"
CHAT_PATH = "/v1/chat/completions"
MiB = 1024 * 1024
FORM = [("content-type", "multipart/form-data; boundary=b")]


class Received:
    """One request as the backend parsed it."""

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.size = 0
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode().lower()] = value.decode()

    def on_body(self, body: bytes) -> None:
        self.size += len(body)

    def on_message_complete(self) -> None:
        self.complete = True


class Backend_:
    """A model server that reads each upload whole and answers its size, or (`fail_after`)
    closes the connection once it got that many body bytes, as a backend that dies."""

    def __init__(self, fail_after: int | None = None, read_size: int = 64 * 1024) -> None:
        self.fail_after, self.read_size = fail_after, read_size
        self.requests: list[Received] = []
        self.open = 0
        self.url = ""
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Backend_:
        port = free_port()
        self._server = await asyncio.start_server(self.serve, "127.0.0.1", port)
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        received = Received()
        self.requests.append(received)
        parser = httptools.HttpRequestParser(received)
        try:
            while not received.complete and (data := await reader.read(self.read_size)):
                parser.feed_data(data)
                if self.fail_after is not None and received.size >= self.fail_after:
                    return
            if received.complete:
                body = json.dumps({"size": received.size}).encode()
                head = f"HTTP/1.1 200 OK\r\ncontent-length: {len(body)}\r\n\r\n"
                writer.write(head.encode() + body)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self.open -= 1
            writer.close()


class HubEnd:
    """The hub's end of the connection: a real Channel, frames pumped to stream inboxes."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.next_id = 1

    async def pump(self) -> None:
        while (frames := await self.channel.next_frames()) is not None:
            for frame in frames:
                state = self.channel.streams.get(frame.stream)
                if state is not None:
                    state.inbox.put_nowait(frame)
        self.channel.close()

    def open(self, path: str = AUDIO, headers: list[tuple[str, str]] | None = None) -> StreamState:
        state = self.channel.open(self.next_id)
        self.next_id += 1
        head = wire.RequestHead(MODEL, "POST", path, headers if headers is not None else FORM)
        self.channel.send(wire.encode_request(state.id, head))
        return state

    async def upload(self, state: StreamState, size: int, piece: int = 100_000) -> None:
        """`size` bytes as DATA within the stream's credit, then END."""
        for at in range(0, size, piece):
            await self.channel.send_data(state, b"a" * min(piece, size - at))
        self.channel.send(wire.encode_end(state.id))

    async def answer(self, state: StreamState) -> tuple[int, dict[str, Any]]:
        """(status, JSON body) of the stream's answer (an ERROR frame: its status)."""
        first = await state.inbox.get()
        assert not isinstance(first, Lost)
        if first.type == wire.ERROR:
            return wire.parse_error(first.payload).status, {}
        body = b""
        while True:
            frame = await state.inbox.get()
            assert not isinstance(frame, Lost)
            if frame.type == wire.END:
                break
            if frame.type == wire.ERROR:
                return wire.parse_error(frame.payload).status, {}
            body += frame.payload
        return wire.parse_response(first.payload).status, json.loads(body)


class Agent:
    """The router with the real Forwarder and HTTP client; `sessions` made on connect."""

    def __init__(self, router: Router, registry: BackendRegistry) -> None:
        self.router, self.registry = router, registry
        self.sessions: list[session.Session] = []


@contextlib.asynccontextmanager
async def agent(
    tmp_path: Path,
    *urls: str,
    max_body: int = 64 * MiB,
    streams: int = 64,
    slots: int = 8,
    idle: float = 300,
) -> AsyncIterator[Agent]:
    endpoints: Any = ["transcriptions", "chat"]
    service = ServiceConfig(name=MODEL, model=MODEL, endpoints=endpoints, target_concurrency=slots)
    config = AgentConfig(
        state_dir=tmp_path,
        services=[service],
        router=RouterConfig(max_body_bytes=max_body, queue_timeout=20, idle_timeout=idle),
    )
    registry = BackendRegistry()
    registry.publish(MODEL, [Backend(MODEL, f"job-{i}", url) for i, url in enumerate(urls)])
    async with HttpClient(connect_timeout=5) as http:
        router = Router(lambda: config, registry, Forwarder(http, registry, config.router))
        router.max_streams = streams
        yield Agent(router, registry)
        await router.close()


@contextlib.asynccontextmanager
async def hub_end(running: Agent, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[HubEnd]:
    made = running.sessions

    class Kept(session.Session):
        def __init__(self, router: Any, channel: Channel) -> None:
            super().__init__(router, channel)
            made.append(self)

    monkeypatch.setattr(server, "Session", Kept)
    theirs, ours = socket.socketpair()
    reader, writer = await asyncio.open_unix_connection(sock=theirs)
    task = asyncio.create_task(running.router.handle_connection(reader, writer))
    hub_reader, hub_writer = await asyncio.open_unix_connection(sock=ours)
    channel = Channel(hub_reader, hub_writer)
    channel.send(wire.encode_hello())
    assert await asyncio.wait_for(channel.read_hello(), 10) == wire.VERSION
    hub = HubEnd(channel)
    pumping = asyncio.create_task(hub.pump())
    try:
        yield hub
    finally:
        channel.close()
        pumping.cancel()
        task.cancel()
        await asyncio.gather(pumping, task, return_exceptions=True)


class Peak:
    """The session's held bytes, sampled after every frame it handles."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.held = 0
        dispatch = session.Session.dispatch

        def sampled(this: session.Session, frame: wire.Frame) -> None:
            dispatch(this, frame)
            self.held = max(self.held, this.held)

        monkeypatch.setattr(session.Session, "dispatch", sampled)


async def test_uploads_stream_through_with_a_window_each_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two concurrent 12 MiB uploads to a backend that reads slowly pass whole; the session
    holds at most about one window per upload (buffered, it would hold 24 MiB)."""
    peak = Peak(monkeypatch)
    size = 12 * MiB
    async with Backend_(read_size=16 * 1024) as backend, agent(tmp_path, backend.url) as running:
        async with hub_end(running, monkeypatch) as hub:
            states = [hub.open() for _ in range(2)]
            answers = await asyncio.wait_for(
                asyncio.gather(*(_send_and_answer(hub, s, size) for s in states)), 60
            )
        [kept] = running.sessions
    assert answers == [(200, {"size": size})] * 2
    assert [r.size for r in backend.requests] == [size] * 2
    assert all(r.headers.get("transfer-encoding") == "chunked" for r in backend.requests)
    # Each stream's window (1 MiB) and its head: never a body.
    assert 0 < peak.held <= 2 * (wire.INITIAL_WINDOW + 2 * session.HEAD_COST)
    assert kept.held == 0 and not kept.uploads and not kept.incoming


async def _send_and_answer(hub: HubEnd, state: StreamState, size: int) -> tuple[int, Any]:
    sending = asyncio.create_task(hub.upload(state, size))
    answer = await hub.answer(state)
    await sending
    return answer


async def test_the_413_limit_holds_while_streaming(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with (
        Backend_() as backend,
        agent(tmp_path, backend.url, max_body=MiB) as running,
        hub_end(running, monkeypatch) as hub,
    ):
        state = hub.open()
        # The hub can send all of it (credit comes back for the discarded rest).
        status, body = await asyncio.wait_for(_send_and_answer(hub, state, 3 * MiB), 30)
        after = hub.open()
        fine = await asyncio.wait_for(_send_and_answer(hub, after, 1000), 30)
        [kept] = running.sessions
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert fine == (200, {"size": 1000})
    assert kept.held == 0 and not kept.uploads


async def test_a_backend_failing_mid_upload_is_an_error_not_a_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first backend takes part of the body, then dies: the client gets 502
    upload_failed (the bytes are gone), the second backend never sees the request."""
    async with (
        Backend_(fail_after=300_000) as dying,
        Backend_() as healthy,
        agent(tmp_path, dying.url, healthy.url) as running,
    ):
        async with hub_end(running, monkeypatch) as hub:
            state = hub.open()
            status, body = await asyncio.wait_for(_send_and_answer(hub, state, 3 * MiB), 30)
        [kept] = running.sessions
    assert status == 502 and body["error"]["code"] == "upload_failed"
    assert len(dying.requests) == 1 and healthy.requests == []
    assert kept.held == 0 and not kept.uploads


async def test_an_unreachable_backend_before_any_byte_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"
    async with (
        Backend_() as healthy,
        agent(tmp_path, nobody, healthy.url) as running,
        hub_end(running, monkeypatch) as hub,
    ):
        state = hub.open()
        answer = await asyncio.wait_for(_send_and_answer(hub, state, 2 * MiB), 30)
    assert answer == (200, {"size": 2 * MiB})


async def test_a_client_cancel_mid_upload_aborts_the_backend_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with (
        Backend_() as backend,
        agent(tmp_path, backend.url) as running,
        hub_end(running, monkeypatch) as hub,
    ):
        state = hub.open()
        await hub.channel.send_data(state, b"a" * 500_000)  # no END: the client stalls
        await until(lambda: backend.open == 1, 10, "the upload reached the backend")
        [kept] = running.sessions
        await until(lambda: kept.uploads, 10, "the upload in the session")
        hub.channel.send(wire.encode_frame(wire.CANCEL, state.id))
        await until(lambda: backend.open == 0, 10, "the backend request aborted")
        await until(lambda: not kept.uploads, 10, "the upload released")
        assert kept.held == 0 and not kept.channel.streams
        [busy] = running.registry.ready(MODEL)
        assert busy.in_flight == 0  # its slot was given back
        # The connection goes on serving.
        again = hub.open()
        answer = await asyncio.wait_for(_send_and_answer(hub, again, 1000), 30)
    assert answer == (200, {"size": 1000})
    assert not backend.requests[0].complete


async def test_a_stream_refused_at_its_head_gets_credit_for_its_body(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent refuses a stream at REQUEST (too many streams) and keeps nothing of it;
    the hub, which sends the body before reading the answer, must not wait for credit for
    ever (the hub answered 504 after its first-byte timeout): DATA of a stream no longer
    open gets its credit back."""
    async with (
        Backend_() as backend,
        agent(tmp_path, backend.url, streams=1) as running,
        hub_end(running, monkeypatch) as hub,
    ):
        holder = hub.open()
        await hub.channel.send_data(holder, b"a" * 1000)  # the one stream: still open
        refused = hub.open(CHAT_PATH, [("content-type", "application/json")])
        status, body = await asyncio.wait_for(_send_and_answer(hub, refused, 3 * MiB), 30)
        hub.channel.send(wire.encode_end(holder.id))
        held = await asyncio.wait_for(hub.answer(holder), 30)
    assert status == 503 and body["error"]["code"] == "too_many_streams"
    assert held == (200, {"size": 1000})


async def test_an_upload_refused_while_it_waits_for_a_backend_is_never_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backend's one slot is taken (an upload that stalls); a second upload passes the
    413 limit (below the stream's window, so that its bytes arrive while it waits) in the
    queue: once the slot frees it is answered 413 without a connection to the backend."""
    async with (
        Backend_() as backend,
        agent(tmp_path, backend.url, max_body=300_000, slots=1) as running,
        hub_end(running, monkeypatch) as hub,
    ):
        holder = hub.open()
        await hub.channel.send_data(holder, b"a" * 1000)  # no END: it holds the slot
        await until(lambda: backend.open == 1, 10, "the first upload at the backend")
        waiting = hub.open()
        await asyncio.wait_for(hub.upload(waiting, 3 * MiB), 30)  # credit for all of it
        [kept] = running.sessions
        await until(lambda: waiting.id not in kept.uploads, 10, "the upload's END handled")
        hub.channel.send(wire.encode_frame(wire.CANCEL, holder.id))
        status, body = await asyncio.wait_for(hub.answer(waiting), 30)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert len(backend.requests) == 1  # the holder's only


async def test_an_upload_that_stalls_ends_after_the_idle_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client sends part of the upload and nothing more (no END): after idle_timeout
    without a piece the request ends (408, the client's fault, not the model's) and the
    backend's connection is closed; the first-byte timeout (600 s) does not hold it."""
    async with (
        Backend_() as backend,
        agent(tmp_path, backend.url, idle=1.0) as running,
        hub_end(running, monkeypatch) as hub,
    ):
        state = hub.open()
        await hub.channel.send_data(state, b"a" * 200_000)
        status, body = await asyncio.wait_for(hub.answer(state), 30)
        await until(lambda: backend.open == 0, 10, "the backend's connection closed")
        [kept] = running.sessions
        assert kept.held == 0 and not kept.uploads
    assert status == 408 and body["error"]["code"] == "upload_stalled"
