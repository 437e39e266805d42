"""An upload through the openai upstream streams on as it arrives (chunked), not joined
whole first: the upstream server holds the first piece before the client sends the rest."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httptools

from hub.config import OpenAIUpstreamConfig
from hub.upstreams.base import UpstreamRequest
from hub.upstreams.openai import OpenAIUpstream, shared_client
from saia.sandbox.process import free_port


class Upload:
    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.size = 0
        self.first_piece = asyncio.Event()
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode().lower()] = value.decode()

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        self.first_piece.set()

    def on_message_complete(self) -> None:
        self.complete = True


async def test_an_upload_reaches_the_provider_while_the_client_still_sends() -> None:
    upload = Upload()

    async def provider(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = httptools.HttpRequestParser(upload)
        while not upload.complete and (data := await reader.read(65536)):
            parser.feed_data(data)
        body = json.dumps({"text": f"{upload.size} bytes"}).encode()
        head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(body)}"
        writer.write(head.encode() + b"\r\n\r\n" + body)
        await writer.drain()
        writer.close()

    async def client_upload() -> AsyncIterator[bytes]:
        yield b"a" * 100_000
        # A buffering upstream would wait here for ever: nothing reaches the provider
        # before the whole body was joined.
        await asyncio.wait_for(upload.first_piece.wait(), 10)
        yield b"b" * 200_000

    port = free_port()
    server = await asyncio.start_server(provider, "127.0.0.1", port)
    config = OpenAIUpstreamConfig(kind="openai", base_url=f"http://127.0.0.1:{port}/v1")
    request = UpstreamRequest(
        "POST", "/v1/audio/transcriptions", client_upload(), "whisper", "req-1",
        content_type="multipart/form-data; boundary=x",
    )  # fmt: skip
    async with server, shared_client(4) as client:
        upstream = OpenAIUpstream("p", config, client, {})
        async with upstream.stream(request) as response:
            body = b"".join([chunk async for chunk in response.chunks])
    assert response.status == 200 and json.loads(body) == {"text": "300000 bytes"}
    assert upload.headers["transfer-encoding"] == "chunked"
    assert upload.headers["content-type"] == "multipart/form-data; boundary=x"
