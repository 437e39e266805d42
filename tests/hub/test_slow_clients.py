"""Slow senders against a real uvicorn hub on 127.0.0.1, over raw sockets: a client that
trickles its request head or body is cut off at the configured bound (408 for a late body),
and other clients are served meanwhile; a head of unbounded size is cut off too."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.fixtures.standin import STANDIN_MODEL
from tests.hub.helpers import RunningHub, hub_config, running_hub

HEAD_S, BODY_IDLE_S, BODY_S = 1.0, 1.0, 3.0
# Far above the bounds (a loaded 2-core machine), far below a trickler's own pace.
CUT_OFF_WITHIN_S = 8.0


@pytest.fixture
async def hub(tmp_path: Path, standin_server: str) -> AsyncIterator[RunningHub]:
    timeouts = {"head": HEAD_S, "body_idle": BODY_IDLE_S, "body": BODY_S}
    config = hub_config(tmp_path, standin_server, STANDIN_MODEL, client_timeouts=timeouts)
    async with running_hub(config) as running:
        yield running


async def connect(hub: RunningHub) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = hub.url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def trickle(writer: asyncio.StreamWriter, data: bytes, pause_s: float) -> int:
    """Send `data` a byte at a time; how many bytes went out before the hub hung up."""
    for sent, byte in enumerate(data):
        try:
            writer.write(bytes([byte]))
            await writer.drain()
        except ConnectionError:
            return sent
        await asyncio.sleep(pause_s)
    return len(data)


async def answer_when_cut_off(reader: asyncio.StreamReader) -> tuple[bytes, float]:
    """Everything the hub sent until it closed the connection, and when it closed."""
    try:
        async with asyncio.timeout(CUT_OFF_WITHIN_S):
            data = await reader.read()
    except TimeoutError:
        pytest.fail(f"the hub kept a slow client's connection for {CUT_OFF_WITHIN_S} s")
    except ConnectionError:
        data = b""
    return data, time.monotonic()


def completion_head(key: str, length: int) -> bytes:
    return (
        f"POST /v1/completions HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def completion_body() -> bytes:
    return json.dumps({"model": STANDIN_MODEL, "prompt": "a", "max_tokens": 1}).encode()


async def test_slow_heads_are_cut_off_while_others_are_served(hub: RunningHub) -> None:
    key = await hub.create_key()
    head = completion_head(key, len(completion_body()))  # ~200 bytes: 100 s at this pace
    slow = [await connect(hub) for _ in range(8)]
    started = time.monotonic()
    trickling = [asyncio.create_task(trickle(w, head, 0.5)) for _r, w in slow]
    slow.append(await connect(hub))  # and one that sends nothing at all
    async with hub.client(key) as http:
        served = [await http.post("/v1/completions", content=completion_body()) for _ in range(5)]
    results = [await answer_when_cut_off(reader) for reader, _writer in slow]
    for task in trickling:
        task.cancel()
    for _reader, writer in slow:
        writer.close()
    assert [response.status_code for response in served] == [200] * 5
    for data, closed_at in results:
        assert data == b""  # an incomplete head gets no answer, only the close
        assert closed_at - started < CUT_OFF_WITHIN_S


async def test_a_slow_head_on_a_kept_alive_connection_is_cut_off(hub: RunningHub) -> None:
    """uvicorn's keep-alive timer stops at a new request's first byte; the head bound
    takes over from there."""
    key = await hub.create_key()
    body = completion_body()
    reader, writer = await connect(hub)
    writer.write(completion_head(key, len(body)) + body)
    await writer.drain()
    first = await reader.readuntil(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200")
    length = next(
        int(line.split(b":")[1])
        for line in first.lower().split(b"\r\n")
        if line.startswith(b"content-length:")
    )
    await reader.readexactly(length)
    trickling = asyncio.create_task(trickle(writer, completion_head(key, len(body)), 0.5))
    rest, _closed_at = await answer_when_cut_off(reader)
    trickling.cancel()
    writer.close()
    assert rest == b""


async def test_a_stalled_body_gets_408(hub: RunningHub) -> None:
    key = await hub.create_key()
    body = completion_body()
    reader, writer = await connect(hub)
    writer.write(completion_head(key, len(body)) + body[:10])  # then nothing more
    await writer.drain()
    answer, _closed_at = await answer_when_cut_off(reader)
    writer.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert b"\r\nx-content-type-options: nosniff\r\n" in head  # like every other error
    assert json.loads(payload)["error"]["code"] == "request_timeout"


async def test_a_trickled_body_gets_408_at_the_whole_body_bound(hub: RunningHub) -> None:
    """Each piece comes within body_idle, but the whole body takes longer than `body`."""
    key = await hub.create_key()
    body = completion_body()
    reader, writer = await connect(hub)
    writer.write(completion_head(key, len(body)))
    await writer.drain()
    started = time.monotonic()
    trickling = asyncio.create_task(trickle(writer, body, BODY_IDLE_S / 4))
    answer, closed_at = await answer_when_cut_off(reader)
    trickling.cancel()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408")
    assert closed_at - started >= BODY_S  # not cut off by the idle bound


async def test_a_body_sent_in_time_is_served(hub: RunningHub) -> None:
    """Pieces with gaps below body_idle, the whole within `body`: a normal answer."""
    key = await hub.create_key()
    body = completion_body()
    reader, writer = await connect(hub)
    writer.write(completion_head(key, len(body)))
    await writer.drain()
    for start in range(0, len(body), len(body) // 3 + 1):
        await asyncio.sleep(BODY_IDLE_S / 2)
        writer.write(body[start : start + len(body) // 3 + 1])
        await writer.drain()
    async with asyncio.timeout(CUT_OFF_WITHIN_S):
        head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    assert head.startswith(b"HTTP/1.1 200")


async def test_an_endless_head_is_cut_off_by_size(hub: RunningHub) -> None:
    """httptools buffers a header line of any length: without a bound one client could
    fill the hub's memory within the head's time bound."""
    reader, writer = await connect(hub)
    piece = b"a" * 65536
    sent = 0
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: hub\r\nX-Pad: ")
    try:
        async with asyncio.timeout(CUT_OFF_WITHIN_S):
            while sent < 64 * 2**20:
                writer.write(piece)
                await writer.drain()
                sent += len(piece)
    except ConnectionError:
        pass
    try:
        answer = await reader.read()
    except ConnectionError:
        answer = b""  # the hub closed with unread bytes: the 431 may be lost to the reset
    writer.close()
    assert sent < 4 * 2**20, f"the hub read {sent >> 20} MiB of one request head"
    assert answer == b"" or answer.startswith(b"HTTP/1.1 431")


async def test_a_large_but_bounded_head_is_served(hub: RunningHub) -> None:
    key = await hub.create_key()
    async with hub.client(key) as http:
        answer = await http.get("/v1/models", headers={"x-pad": "a" * 60_000})
    assert answer.status_code == 200
