"""The agent's router on its Unix socket (no SSH): frames in, real stand-in servers behind."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from cloud_interface.relay import SOCKET_NAME
from hpc.config import AgentConfig, RouterConfig, ServiceConfig
from hpc.registry import Backend, BackendRegistry
from hpc.router.server import serve_requests
from saia.base import protocol as wire
from saia.base.mux import Channel
from tests.fixtures.standin import StandinProcess
from tests.saia.mux_helpers import next_frame

MODEL = "router-model"
CHAT = "/v1/chat/completions"
PROMPT = " ".join(f"w{i}" for i in range(100))


def body(tokens: int, stream: bool = False) -> bytes:
    message = {"role": "user", "content": PROMPT}
    return json.dumps(
        {"model": MODEL, "max_tokens": tokens, "stream": stream, "messages": [message]}
    ).encode()


@asynccontextmanager
async def router(tmp_path: Path, **settings: float) -> AsyncIterator[BackendRegistry]:
    config = AgentConfig(
        state_dir=tmp_path / "state",
        services=[ServiceConfig(name=MODEL, model=MODEL)],
        router=RouterConfig(**settings),
    )
    registry = BackendRegistry()
    task = asyncio.create_task(serve_requests(config, registry))
    async with asyncio.timeout(10):
        while not (config.state_dir / SOCKET_NAME).exists():  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    try:
        yield registry
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert not (config.state_dir / SOCKET_NAME).exists()


@asynccontextmanager
async def channel(tmp_path: Path) -> AsyncIterator[Channel]:
    reader, writer = await asyncio.open_unix_connection(str(tmp_path / "state" / SOCKET_NAME))
    chan = Channel(reader, writer)
    chan.send(wire.encode_hello())
    assert await chan.read_hello() == wire.VERSION
    try:
        yield chan
    finally:
        chan.close()


def request(chan: Channel, stream: int, head: wire.RequestHead, data: bytes) -> None:
    chan.send(wire.encode_request(stream, head))
    for start in range(0, len(data), wire.MAX_DATA):
        chan.send(wire.encode_frame(wire.DATA, stream, data[start : start + wire.MAX_DATA]))
    chan.send(wire.encode_frame(wire.END, stream))


async def frames_until_end(chan: Channel, streams: int = 1) -> dict[int, list[wire.Frame]]:
    got: dict[int, list[wire.Frame]] = {}
    ended = 0
    async with asyncio.timeout(20):
        while ended < streams:
            frame = await next_frame(chan)
            assert frame is not None
            got.setdefault(frame.stream, []).append(frame)
            ended += frame.type in (wire.END, wire.ERROR)
    return got


def head(path: str = CHAT, headers: list[tuple[str, str]] | None = None) -> wire.RequestHead:
    return wire.RequestHead(MODEL, "POST", path, headers or [("content-type", "application/json")])


async def test_backend_key_replaces_the_clients(
    tmp_path: Path, standin_factory: Callable[..., StandinProcess]
) -> None:
    server = standin_factory(MODEL, api_key="backend-secret")
    async with router(tmp_path) as registry, channel(tmp_path) as chan:
        registry.publish(MODEL, [Backend(MODEL, "j", server.url, api_key="backend-secret")])
        smuggled = [("Authorization", "Bearer client"), ("Host", "evil:1"), ("Connection", "x-a")]
        request(chan, 1, head(headers=[*smuggled, ("x-a", "1")]), body(2))
        (frames,) = (await frames_until_end(chan)).values()
        response = wire.parse_response(frames[0].payload)
        assert response.status == 200
        assert not {k.lower() for k, _ in response.headers} & {"transfer-encoding", "connection"}
        answer = json.loads(b"".join(f.payload for f in frames if f.type == wire.DATA))
        assert answer["usage"]["completion_tokens"] == 2


async def test_a_bad_head_fails_its_stream_only(
    tmp_path: Path, standin_factory: Callable[..., StandinProcess]
) -> None:
    async with router(tmp_path) as registry, channel(tmp_path) as chan:
        registry.publish(MODEL, [Backend(MODEL, "j", standin_factory(MODEL).url)])
        chan.send(wire.encode_frame(wire.REQUEST, 1, b'{"service": 5}'))
        chan.send(wire.encode_frame(wire.END, 1))
        request(chan, 2, head(headers=[("bad header", "x")]), body(1))
        request(chan, 3, head(), body(1))
        chan.send(wire.encode_frame(wire.PING, 0, b"12345678"))
        got = await frames_until_end(chan, 3)
        statuses = {s: wire.parse_response(f[0].payload).status for s, f in got.items()}
        assert statuses == {1: 400, 2: 400, 3: 200}


async def test_slow_reader_stalls_only_its_own_stream(
    tmp_path: Path, standin_factory: Callable[..., StandinProcess]
) -> None:
    big = " ".join(f"w{i}" for i in range(200000))  # a ~1.4 MB answer, beyond one window
    payload = json.dumps({"model": MODEL, "max_tokens": 200000, "prompt": big}).encode()
    async with router(tmp_path, max_body_bytes=2**22) as registry, channel(tmp_path) as chan:
        registry.publish(MODEL, [Backend(MODEL, "j", standin_factory(MODEL).url)])
        request(chan, 1, head("/v1/completions"), payload)
        request(chan, 3, head(), body(1))
        received, ended = 0, False
        async with asyncio.timeout(20):
            while True:  # never grant stream 1 credit; stream 3 must still complete
                frame = await next_frame(chan)
                assert frame is not None
                if frame.stream == 1 and frame.type == wire.DATA:
                    received += len(frame.payload)
                ended = ended or (frame.stream == 1 and frame.type == wire.END)
                if frame.stream == 3 and frame.type == wire.END:
                    break
        with contextlib.suppress(TimeoutError):  # take whatever else comes within 0.5 s
            async with asyncio.timeout(0.5):
                while (frame := await next_frame(chan)) is not None:
                    received += len(frame.payload) if frame.type == wire.DATA else 0
                    ended = ended or frame.type == wire.END
        assert 0 < received <= wire.INITIAL_WINDOW
        assert not ended
        chan.send(wire.encode_frame(wire.CANCEL, 1))


def test_socket_is_owner_only(tmp_path: Path) -> None:
    async def mode() -> int:
        async with router(tmp_path):
            return stat.S_IMODE(os.stat(tmp_path / "state" / SOCKET_NAME).st_mode)

    assert asyncio.run(mode()) == 0o600


async def test_router_timeouts_first_byte_and_idle(
    tmp_path: Path, standin_factory: Callable[..., StandinProcess]
) -> None:
    slow = standin_factory(MODEL, token_delay=1.0)
    settings = {"first_byte_timeout": 0.5, "idle_timeout": 0.5}
    async with router(tmp_path, **settings) as registry, channel(tmp_path) as chan:
        registry.publish(MODEL, [Backend(MODEL, "j", slow.url)])
        request(chan, 1, head(), body(3))  # not streamed: nothing comes for 3 s
        request(chan, 3, head(), body(3, stream=True))  # streamed: the head, then 1 s gaps
        got = await frames_until_end(chan, 2)
        assert wire.parse_response(got[1][0].payload).status == 504
        assert got[3][0].type == wire.RESPONSE
        events = b"".join(f.payload for f in got[3] if f.type == wire.DATA)
        last = json.loads(events.strip().split(b"\n\n")[-1].removeprefix(b"data: "))
        assert last["object"] == "error"
        assert "sent nothing for" in last["error"]["message"]
        assert got[3][-1].type == wire.END
        assert registry.in_flight_of(MODEL, "j") == 0


async def test_retry_goes_to_the_other_backend_with_its_own_key(
    tmp_path: Path, standin_factory: Callable[..., StandinProcess]
) -> None:
    dead = standin_factory(MODEL, api_key="key-of-a")
    live = standin_factory(MODEL, api_key="key-of-b")
    dead.stop()
    async with router(tmp_path) as registry, channel(tmp_path) as chan:
        registry.publish(
            MODEL,
            [
                Backend(MODEL, "a-dead", dead.url, api_key="key-of-a"),  # picked first
                Backend(MODEL, "b-live", live.url, api_key="key-of-b"),
            ],
        )
        request(chan, 1, head(), body(1))
        (frames,) = (await frames_until_end(chan)).values()
        assert wire.parse_response(frames[0].payload).status == 200
        assert registry.ready(MODEL)[1].served == 1
