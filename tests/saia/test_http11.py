"""The lean HTTP/1.1 client (router and hub) against real servers on 127.0.0.1: the stand-in model
server, and small asyncio servers that misbehave in the ways real servers do (closing idle
keep-alive connections, close-delimited bodies, stalling, TLS)."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from saia.base.http11 import ConnectFailed, HttpClient, NoResponse, ResponseBroken, parse_url
from saia.sandbox.process import free_port
from tests.fixtures.standin import STANDIN_MODEL, StandinProcess

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
CHAT = {"model": STANDIN_MODEL, "messages": [{"role": "user", "content": "a b c"}]}


class Server:
    """An asyncio TCP server on 127.0.0.1 that counts its connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.accepted = 0
        self.open = 0
        self.most_open = 0
        self.url = ""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open -= 1
            writer.close()


@asynccontextmanager
async def serving(handler: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[Server]:
    server = Server(handler)
    listener = await asyncio.start_server(server.serve, "127.0.0.1", free_port(), ssl=tls)
    server.url = f"{'https' if tls else 'http'}://127.0.0.1:{listener.sockets[0].getsockname()[1]}"
    async with listener:
        yield server
        listener.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return await reader.readexactly(length)


def answer(body: bytes, extra: str = "") -> bytes:
    head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n{extra}"
    return (head + f"content-length: {len(body)}\r\n\r\n").encode() + body


async def get(client: HttpClient, url: str, body: bytes = b"{}") -> tuple[int, bytes]:
    async with client.stream("POST", url, [("content-type", "application/json")], body, 5) as r:
        return r.status, b"".join([chunk async for chunk in r.chunks(5)])


async def test_stand_in_answers_streamed_and_not_over_one_reused_connection(
    standin_server: str,
) -> None:
    url = f"{standin_server}/v1/chat/completions"
    async with HttpClient(4, keepalive_expiry=2.0) as client:
        status, body = await get(client, url, json.dumps(CHAT).encode())
        assert status == 200 and json.loads(body)["choices"][0]["message"]["content"]
        stream = json.dumps({**CHAT, "stream": True}).encode()
        async with client.stream("POST", url, [], stream, 5) as response:
            assert ("content-type", "text/event-stream; charset=utf-8") in response.headers
            events = b"".join([chunk async for chunk in response.chunks(5)])
        assert events.rstrip().endswith(b"data: [DONE]")
        assert client._idle_count == 1 and not client._busy  # one connection, pooled


async def test_idle_connection_closed_by_the_server_is_replaced_once() -> None:
    async def one_answer_per_connection(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await read_request(reader)
        writer.write(answer(b'{"n": 1}'))  # keep-alive by default
        await writer.drain()
        await read_request(reader)  # the next request on it: closed unanswered (idle timeout)

    async with serving(one_answer_per_connection) as server, HttpClient(4, 30.0) as client:
        url = f"{server.url}/x"
        assert await get(client, url) == (200, b'{"n": 1}')
        assert await get(client, url) == (200, b'{"n": 1}')  # on a new connection
        assert server.accepted == 2


async def test_a_fresh_connection_that_breaks_is_an_error_not_a_retry() -> None:
    async def close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async with serving(close_at_once) as server, HttpClient(4, 30.0) as client:
        with pytest.raises(NoResponse):  # a ResponseBroken before any answer came back
            await get(client, f"{server.url}/x")
        assert server.accepted == 1 and client._idle_count == 0


async def test_body_delimited_by_the_close_of_the_connection() -> None:
    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\npart one, ")
        await writer.drain()
        writer.write(b"part two")
        await writer.drain()

    async with serving(until_close) as server, HttpClient(4, 30.0) as client:
        assert await get(client, f"{server.url}/x") == (200, b"part one, part two")
        assert client._idle_count == 0 and not client._busy


async def test_a_body_cut_short_is_broken_after_the_head() -> None:
    async def cut_short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
        await writer.drain()

    async with serving(cut_short) as server, HttpClient(4, 30.0) as client:
        with pytest.raises(ResponseBroken) as raised:
            await get(client, f"{server.url}/x")
        assert not isinstance(raised.value, NoResponse)  # the head had come: not a retry case
        assert client._idle_count == 0 and not client._busy


async def test_at_most_max_connections_and_the_rest_wait() -> None:
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            await asyncio.sleep(0.05)
            writer.write(answer(b"{}"))
            await writer.drain()

    async with serving(slow) as server, HttpClient(2, 30.0) as client:
        url = f"{server.url}/x"
        results = await asyncio.gather(*(get(client, url) for _ in range(6)))
        assert results == [(200, b"{}")] * 6
        assert server.most_open == 2 and client._idle_count == 2


async def test_cancelled_and_abandoned_exchanges_close_their_connections() -> None:
    async def head_then_stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await writer.drain()
        await reader.read()  # until the client closes

    async with serving(head_then_stall) as server, HttpClient(8, 30.0) as client:
        url = f"{server.url}/x"

        async def abandon() -> None:  # the first chunk, then away
            async with client.stream("POST", url, [], b"{}", 5) as response:
                async for chunk in response.chunks(5):
                    assert chunk == b"abc"
                    break

        async def cancelled() -> None:
            task = asyncio.create_task(get(client, url))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        await asyncio.gather(*(abandon() for _ in range(4)), *(cancelled() for _ in range(4)))
        for _ in range(100):
            if server.open == 0:
                break
            await asyncio.sleep(0.02)
        assert server.accepted == 8 and server.open == 0
        assert client._idle_count == 0 and not client._busy and client._slots._value == 8


async def test_unreachable_server_and_pool_wait_time_out() -> None:
    async with HttpClient(1, 30.0) as client:
        with pytest.raises(ConnectFailed):
            await get(client, f"http://127.0.0.1:{free_port()}/x")

    async def never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async with serving(never) as server, HttpClient(1, 30.0) as client:
        url = f"{server.url}/x"
        busy = asyncio.create_task(get(client, url))
        await asyncio.sleep(0.05)
        with pytest.raises(TimeoutError):
            async with client.stream("POST", url, [], b"{}", 0.1):
                pass
        busy.cancel()
        with pytest.raises(asyncio.CancelledError):
            await busy


def test_urls_and_host_headers() -> None:
    assert parse_url("https://api.example.org/v1/chat?x=1").path == "/v1/chat?x=1"
    assert parse_url("https://api.example.org/v1").host_header == "api.example.org"
    assert parse_url("http://[::1]:8080/v1").host_header == "[::1]:8080"
    with pytest.raises(ValueError, match="not an http"):
        parse_url("ftp://example.org/")


def self_signed(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a certificate for 127.0.0.1 and a client context trusting it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_file, key_file)
    return server, ssl.create_default_context(cafile=str(cert_file))


async def test_tls_verified_against_the_trusted_certificates(tmp_path: Path) -> None:
    server_tls, client_tls = self_signed(tmp_path)

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            writer.write(answer(await read_request(reader)))
            await writer.drain()

    async with serving(echo, server_tls) as server:
        url = f"{server.url}/x"
        async with HttpClient(2, 30.0, tls=client_tls) as client:
            assert await get(client, url, b'{"tls": true}') == (200, b'{"tls": true}')
            assert await get(client, url, b"{}") == (200, b"{}")
            assert server.accepted == 1
        async with HttpClient(2, 30.0) as client:  # the public CAs do not know it
            with pytest.raises(ConnectFailed, match="SSL"):
                await get(client, url)


async def test_pooled_connections_are_reused_and_a_dead_backend_is_unreachable(
    standin_factory: Callable[..., StandinProcess],
) -> None:
    server = standin_factory(STANDIN_MODEL)
    async with HttpClient(connect_timeout=5) as http:
        for _ in range(3):
            response = await http.send(server.url, "GET", "/health", [], b"")
            assert response.status == 200
            assert b"".join([chunk async for chunk in response.chunks()]) == b""
            http.release(response)
        assert (http.idle_connections, http.busy_connections) == (1, 0)  # one served all three
        server.stop()
        with pytest.raises(ConnectFailed):  # the stale one fails, a new one is refused
            await http.send(server.url, "GET", "/health", [], b"")


async def test_cancelled_backend_exchanges_close_their_connections(
    standin_factory: Callable[..., StandinProcess],
) -> None:
    server = standin_factory(STANDIN_MODEL, token_delay=0.05)
    async with HttpClient(connect_timeout=5) as http:

        async def read_a_little() -> None:
            response = await http.send(
                server.url,
                "POST",
                "/v1/chat/completions",
                [],
                json.dumps({**CHAT, "max_tokens": 100, "stream": True}).encode(),
            )
            try:
                async for _chunk in response.chunks():
                    await asyncio.sleep(10)  # cancelled here, mid-body
            finally:
                http.release(response)

        tasks = [asyncio.create_task(read_a_little()) for _ in range(20)]
        async with asyncio.timeout(10):
            while http.busy_connections < 20:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert (http.busy_connections, http.idle_connections) == (0, 0)  # none half-read reused
        response = await http.send(server.url, "GET", "/health", [], b"")
        assert response.status == 200
        http.release(response)
