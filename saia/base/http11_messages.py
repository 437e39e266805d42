"""The messages of saia's HTTP/1.1 client (`saia.base.http11`): request heads and bodies
written, responses parsed.

A request body is bytes (sent with the head in one write) or a `BodyStream`, pieces that
arrive while the request is sent (an upload passed on as it comes): written piece by
piece, each write drained before the next piece is pulled, so that the client holds at
most one piece and the socket's buffer. Its Content-Length is sent when the caller knows
it, else the body goes chunked (uvicorn, hence vLLM, reads both). A stream is consumed
once: a request whose body was partly sent is never sent again (`BodyStream.started`).

Responses are parsed by httptools (llhttp, C) and handed on chunk by chunk as they arrive.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from functools import cached_property
from urllib.parse import urlsplit

import httptools

READ_SIZE = 256 * 1024
MAX_HEAD = 256 * 1024  # bytes before the end of the response head
_DEFAULT_PORTS = {"http": 80, "https": 443}
# The client pools connections per origin and TLS context (a job's pinned certificate).
PoolKey = tuple[tuple[str, str, int], ssl.SSLContext | None]


class ConnectFailed(Exception):
    """No connection to the server (refused, unreachable, TLS, bad URL): nothing was sent."""


class ResponseBroken(Exception):
    """The exchange broke after the request was sent (reset, closed, invalid HTTP)."""


class NoResponse(ResponseBroken):
    """The exchange broke before the response head arrived: no answer came back."""


class BodyMismatch(Exception):
    """A streamed body's pieces did not add up to the length announced for it."""


class BodyStream:
    """A request body that streams in: `pieces` pulled once, `length` if known."""

    __slots__ = ("_pieces", "length", "sent", "started")

    def __init__(self, pieces: AsyncIterable[bytes], length: int | None = None) -> None:
        self._pieces = pieces
        self.length = length
        self.started = False  # a piece was pulled: the body cannot be sent again
        self.sent = 0  # bytes written so far

    async def write(self, writer: asyncio.StreamWriter) -> None:
        """Write the body after its head: each piece drained before the next is pulled.
        Raises what the pieces raise, BodyMismatch, or OSError from the socket."""
        chunked = self.length is None
        self.started = True
        async for piece in self._pieces:
            if not piece:
                continue
            self.sent += len(piece)
            if self.length is not None and self.sent > self.length:
                raise BodyMismatch(f"the body is longer than its {self.length} bytes")
            if chunked:
                writer.writelines([b"%x\r\n" % len(piece), piece, b"\r\n"])
            else:
                writer.write(piece)
            await writer.drain()
        if self.length is not None and self.sent != self.length:
            raise BodyMismatch(f"the body ended after {self.sent} of {self.length} bytes")
        if chunked:
            writer.write(b"0\r\n\r\n")


Body = bytes | BodyStream


@dataclass(frozen=True)
class Target:
    """Where a URL points: the connection's origin and the request line's target."""

    scheme: str
    host: str
    port: int
    path: str  # path and query, e.g. /v1/chat/completions?x=1

    @cached_property  # both read per request: computed once per (cached) Target
    def origin(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)

    @cached_property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == _DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"


def parse_url(url: str) -> Target:
    parts = urlsplit(url)
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(parts.scheme, parts.hostname, parts.port or _DEFAULT_PORTS[parts.scheme], path)


def encode_request(
    method: str,
    path: str,
    host: str,
    headers: list[tuple[str, str]],
    body: Body,
    encoding: str = "latin-1",
) -> bytes:
    """The request head, and the body too when it is bytes (one write)."""
    if isinstance(body, bytes):
        framing = f"content-length: {len(body)}"
    elif body.length is not None:
        framing = f"content-length: {body.length}"
    else:
        framing = "transfer-encoding: chunked"
    lines = [f"{method} {path} HTTP/1.1", f"host: {host}", framing]
    lines += [f"{name}: {value}" for name, value in headers]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode(encoding)
    return head + body if isinstance(body, bytes) else head


class Connection:
    """One TCP (or TLS) connection and the parser state of its current response."""

    def __init__(
        self,
        pool_key: PoolKey,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.pool_key = pool_key  # the client's pool: origin and TLS context
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0
        self.reused = False
        self.reset()

    def reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.headers: list[tuple[str, str]] = []
        self.body: deque[bytes] = deque()
        self.received = 0
        self.head_done = False
        self.keep_alive = False
        self.complete = False
        self.until_eof = True  # no content-length and not chunked: the body ends at EOF

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        lower = name.decode("latin-1").lower()
        if lower in ("content-length", "transfer-encoding"):
            self.until_eof = False
        self.headers.append((lower, value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.head_done = True
        self.keep_alive = self.parser.should_keep_alive()  # only valid during the callbacks

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True

    async def receive(self) -> None:
        """Read and parse the next piece of the response."""
        broken = ResponseBroken if self.head_done else NoResponse
        try:
            data = await self.reader.read(READ_SIZE)
        except OSError as error:
            raise broken(f"{type(error).__name__}: {error}") from None
        if not data:
            if self.head_done and self.until_eof and not self.complete:
                self.complete, self.keep_alive = True, False
                return
            raise broken("the server closed the connection")
        self.received += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as error:
            raise broken(f"invalid HTTP: {error}") from None
        if not self.head_done and self.received > MAX_HEAD:
            raise NoResponse("the response head is too large")

    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.body and not self.reader.at_eof()

    def close(self) -> None:
        self.writer.close()


class HttpResponse:
    """The response head; the body via `chunks()` or `received()` + `receive()`."""

    def __init__(self, connection: Connection) -> None:
        self.status = connection.parser.get_status_code()
        self.headers = connection.headers  # names in lower case
        self.connection = connection
        self.released = False

    @property
    def complete(self) -> bool:
        return self.connection.complete

    def received(self) -> list[bytes]:
        """The body pieces that have arrived and were not taken yet."""
        body = self.connection.body
        if not body:
            return []
        pieces = list(body)
        body.clear()
        return pieces

    async def receive(self) -> None:
        """Wait for more of the body; raises ResponseBroken if it breaks off."""
        await self.connection.receive()

    async def chunks(self, idle: float | None = None) -> AsyncIterator[bytes]:
        """The (de-chunked) body as it arrives. Raises ResponseBroken if it breaks off,
        TimeoutError if nothing arrives for `idle` seconds (timed only while waiting)."""
        connection = self.connection
        while True:
            while connection.body:
                yield connection.body.popleft()
            if connection.complete:
                return
            async with asyncio.timeout(idle):
                await connection.receive()
