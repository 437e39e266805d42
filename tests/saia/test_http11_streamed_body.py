"""Streamed request bodies of the HTTP/1.1 client (`saia.base.http11.BodyStream`): sent with
their Content-Length when known, chunked otherwise, consumed once (never resent after a
partial send), and a cancelled upload closes its connection. Against small asyncio servers
on 127.0.0.1 that parse requests with httptools (as uvicorn does), and the stand-in's
multipart audio endpoint (uvicorn + Starlette's form parser, as vLLM)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httptools
import pytest

from saia.base.http11 import BodyMismatch, BodyStream, HttpClient, NoResponse
from tests.fixtures.standin import STANDIN_MODEL
from tests.hpc.helpers import until
from tests.saia.test_http11 import answer, read_request, serving


class Received:
    """A request as a server parsed it (httptools: Content-Length and chunked alike)."""

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode().lower()] = value.decode()

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True


class Parsing:
    """A server that parses each request whole, keeps it and answers its body's size."""

    def __init__(self) -> None:
        self.requests: list[Received] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            received = Received()
            parser = httptools.HttpRequestParser(received)
            while not received.complete:
                data = await reader.read(65536)
                if not data:
                    return
                parser.feed_data(data)
            self.requests.append(received)
            writer.write(answer(json.dumps({"size": len(received.body)}).encode()))
            await writer.drain()


async def pieces(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        await asyncio.sleep(0)  # each piece arrives apart, as an upload's do
        yield part


async def post(client: HttpClient, url: str, body: bytes | BodyStream) -> tuple[int, bytes]:
    async with client.stream("POST", url, [("content-type", "text/plain")], body, 5) as r:
        return r.status, b"".join([chunk async for chunk in r.chunks(5)])


async def test_a_streamed_body_goes_with_its_length_or_chunked() -> None:
    parts = [b"a" * 100_000, b"", b"b" * 300_000, b"c"]
    whole = b"".join(parts)
    server = Parsing()
    async with serving(server) as served, HttpClient(4, 30.0) as client:
        url = f"{served.url}/upload"
        known = BodyStream(pieces(*parts), len(whole))
        assert await post(client, url, known) == (200, b'{"size": 400001}')
        unknown = BodyStream(pieces(*parts))
        assert await post(client, url, unknown) == (200, b'{"size": 400001}')
        assert await post(client, url, b"bytes as ever") == (200, b'{"size": 13}')
    first, second, third = server.requests
    assert first.headers["content-length"] == "400001" and bytes(first.body) == whole
    assert "transfer-encoding" not in first.headers
    assert second.headers["transfer-encoding"] == "chunked" and bytes(second.body) == whole
    assert "content-length" not in second.headers
    assert third.headers["content-length"] == "13" and third.body == b"bytes as ever"
    assert known.sent == unknown.sent == len(whole)


async def test_a_streamed_body_that_breaks_its_length_is_refused() -> None:
    async with serving(Parsing()) as served, HttpClient(4, 30.0) as client:
        url = f"{served.url}/upload"
        with pytest.raises(BodyMismatch):
            await post(client, url, BodyStream(pieces(b"12345"), 10))
        with pytest.raises(BodyMismatch):
            await post(client, url, BodyStream(pieces(b"12345", b"678"), 6))
        assert client.idle_connections == 0 and client.busy_connections == 0


async def test_a_partly_sent_body_is_never_sent_again() -> None:
    """The server reads part of the upload and closes unanswered (as one that restarts):
    NoResponse, one connection, the pieces pulled once. Even a pooled connection the server
    closed is not used for a streamed body (it would break it half-sent)."""

    async def closes_midway(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)  # a bytes request first: its connection is pooled
        writer.write(answer(b"{}"))
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")
        await reader.read(1000)  # part of the upload, then the server goes away

    pulled = 0

    async def counted() -> AsyncIterator[bytes]:
        nonlocal pulled
        for _ in range(8):
            pulled += 1
            yield b"x" * 65536
            await asyncio.sleep(0.01)

    async with serving(closes_midway) as served, HttpClient(4, 30.0) as client:
        url = f"{served.url}/upload"
        assert await post(client, url, b"{}") == (200, b"{}")
        assert client.idle_connections == 1
        body = BodyStream(counted())
        with pytest.raises(NoResponse):
            await post(client, url, body)
        assert body.started and 0 < pulled <= 8
        # A new connection was made for the upload and none for a second attempt.
        assert served.accepted == 2
        assert client.busy_connections == 0


async def test_a_failing_body_raises_its_own_error_and_closes_the_connection() -> None:
    class Refused(Exception):
        pass

    async def refusing() -> AsyncIterator[bytes]:
        yield b"part"
        raise Refused("the upload was refused midway")

    server = Parsing()
    async with serving(server) as served, HttpClient(4, 30.0) as client:
        with pytest.raises(Refused):
            await post(client, f"{served.url}/upload", BodyStream(refusing()))
        assert client.busy_connections == 0 and client.idle_connections == 0
        await until(lambda: served.open == 0, 10, "the server saw the connection closed")
    assert server.requests == []  # the server never saw a complete request


async def test_a_cancelled_upload_closes_its_connection_and_frees_its_slot() -> None:
    waiting = asyncio.Event()

    async def stalls() -> AsyncIterator[bytes]:
        yield b"first piece"
        waiting.set()
        await asyncio.Event().wait()  # the client sends nothing more
        yield b"never"

    async with serving(Parsing()) as served, HttpClient(1, 30.0) as client:
        url = f"{served.url}/upload"
        task = asyncio.create_task(post(client, url, BodyStream(stalls())))
        await asyncio.wait_for(waiting.wait(), 10)
        await until(lambda: served.open == 1, 10, "the upload's connection open")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await until(lambda: served.open == 0, 10, "the server saw the connection closed")
        assert client.busy_connections == 0 and client.idle_connections == 0
        # The one slot is free again: the next request gets a connection at once.
        assert await post(client, url, b"after") == (200, b'{"size": 5}')


async def test_stand_in_reads_a_chunked_multipart_upload(standin_server: str) -> None:
    """uvicorn and Starlette's form parser (vLLM's) read a chunked upload whole."""
    boundary = "saiaboundary"
    audio = bytes(range(256)) * 8192  # 2 MiB
    head = (
        f'--{boundary}\r\ncontent-disposition: form-data; name="model"\r\n\r\n'
        f'{STANDIN_MODEL}\r\n--{boundary}\r\ncontent-disposition: form-data; name="file"; '
        f'filename="a.wav"\r\ncontent-type: audio/wav\r\n\r\n'
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    parts = [head, *(audio[i : i + 200_000] for i in range(0, len(audio), 200_000)), tail]
    headers = [("content-type", f"multipart/form-data; boundary={boundary}")]
    url = f"{standin_server}/v1/audio/transcriptions"
    body_stream = BodyStream(pieces(*parts))
    async with HttpClient(4, 2.0) as client, client.stream("POST", url, headers, body_stream) as r:
        body = b"".join([chunk async for chunk in r.chunks(30)])
    assert r.status == 200, body
    assert json.loads(body)["text"] == f"transcribed {len(audio)} bytes of audio"
