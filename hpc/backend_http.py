"""A lean keep-alive HTTP/1.1 client for the router's backend requests (asyncio + httptools).

Why not httpx: measured on the 2-core test machine (bench/hop.py), httpx 0.28 managed
~1.5 ms per sequential request and its pool collapsed to 150-350 requests/s at 64
concurrent requests, where this client does ~0.5 ms and >1200/s against the same stand-in
server. The router forwards every request, so its client must be cheap: one pool of idle
connections per backend address, the request written in one write, the response parsed
by httptools (llhttp, C; already installed with uvicorn[standard]). No total timeout: the
caller times the first byte and each gap between chunks.

Requests are built from values the router has validated: method (upper-case letters),
path (from the allow-list), header names (HTTP tokens) and values (no CR/LF/NUL).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httptools

READ_SIZE = 256 * 1024
IDLE_EXPIRY = 30.0  # close pooled connections unused this long (backends drop them too)


class BackendUnreachable(Exception):
    """No response came back (refused, reset, closed): another backend may take it."""


class BackendBroken(Exception):
    """The backend broke the exchange after the response started."""


class _Connection:
    """One TCP connection and the parser state of its current response."""

    def __init__(
        self, address: tuple[str, int], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.address = address
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0
        self.reused = False
        self.reset()

    def reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.headers: list[tuple[str, str]] = []
        self.body: deque[bytes] = deque()
        self.head_done = False
        self.keep_alive = False
        self.complete = False

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.head_done = True
        self.keep_alive = self.parser.should_keep_alive()  # only valid during the callbacks

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True

    async def receive(self, broken: type[Exception]) -> None:
        """Read and parse the next piece of the response."""
        try:
            data = await self.reader.read(READ_SIZE)
        except (ConnectionError, OSError) as error:
            raise broken(f"connection to the backend failed: {error}") from None
        if not data:
            raise broken("the backend closed the connection")
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as error:
            raise broken(f"invalid HTTP from the backend: {error}") from None

    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.reader.at_eof()

    def close(self) -> None:
        self.writer.close()


class BackendResponse:
    def __init__(self, status: int, headers: list[tuple[str, str]], connection: _Connection):
        self.status = status
        self.headers = headers
        self.connection = connection

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
        """Wait for more of the body; raises BackendBroken if it breaks off."""
        await self.connection.receive(BackendBroken)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (de-chunked); raises BackendBroken if it breaks off."""
        connection = self.connection
        while True:
            while connection.body:
                yield connection.body.popleft()
            if connection.complete:
                return
            await connection.receive(BackendBroken)


def encode_request(
    method: str, path: str, host: str, headers: list[tuple[str, str]], body: bytes
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"host: {host}", f"content-length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body


class BackendHttp:
    """Keep-alive connections to backends; owned by `serve_requests` (`async with`)."""

    def __init__(self, connect_timeout: float, max_idle_per_backend: int = 256) -> None:
        self._connect_timeout = connect_timeout
        self._max_idle = max_idle_per_backend
        self._idle: dict[tuple[str, int], deque[_Connection]] = {}
        self._busy: set[_Connection] = set()
        self._addresses: dict[str, tuple[str, int]] = {}  # parsed base URLs

    async def __aenter__(self) -> BackendHttp:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for pool in self._idle.values():
            for connection in pool:
                connection.close()
        self._idle.clear()
        for connection in self._busy:
            connection.close()
        self._busy.clear()

    async def send(
        self, base_url: str, method: str, path: str, headers: list[tuple[str, str]], body: bytes
    ) -> BackendResponse:
        """Send the request and return the response head; the caller must `release()` it."""
        address = self._addresses.get(base_url)
        if address is None:
            if len(self._addresses) > 1024:  # backends come and go: keep it bounded
                self._addresses.clear()
            address = self._addresses[base_url] = _address(base_url)
        data = encode_request(method, path, f"{address[0]}:{address[1]}", headers, body)
        while True:  # a pooled connection may have been closed by the backend meanwhile
            connection = await self._acquire(address)
            self._busy.add(connection)
            try:
                connection.writer.write(data)
                while not connection.head_done:
                    await connection.receive(BackendUnreachable)
            except BaseException as error:
                self._busy.discard(connection)
                connection.close()
                if isinstance(error, BackendUnreachable | OSError) and connection.reused:
                    continue
                if isinstance(error, OSError):
                    raise BackendUnreachable(str(error)) from None
                raise
            status = connection.parser.get_status_code()
            return BackendResponse(status, connection.headers, connection)

    def release(self, response: BackendResponse) -> None:
        """Back to the pool after a complete exchange; closed otherwise (e.g. cancelled)."""
        connection = response.connection
        self._busy.discard(connection)
        pool = self._idle.setdefault(connection.address, deque())
        if not connection.reusable() or connection.body or len(pool) >= self._max_idle:
            connection.close()
            return
        connection.reset()
        connection.reused = True
        connection.idle_since = time.monotonic()
        pool.append(connection)

    async def _acquire(self, address: tuple[str, int]) -> _Connection:
        pool = self._idle.get(address)
        now = time.monotonic()
        while pool:
            connection = pool.pop()
            if now - connection.idle_since < IDLE_EXPIRY and not connection.reader.at_eof():
                return connection
            connection.close()
        try:
            async with asyncio.timeout(self._connect_timeout):
                reader, writer = await asyncio.open_connection(*address, limit=READ_SIZE)
        except TimeoutError:
            raise BackendUnreachable("connect timed out") from None
        except OSError as error:
            raise BackendUnreachable(error.strerror or type(error).__name__) from None
        return _Connection(address, reader, writer)

    @property
    def idle_connections(self) -> int:
        return sum(len(pool) for pool in self._idle.values())

    @property
    def busy_connections(self) -> int:
        return len(self._busy)


def _address(base_url: str) -> tuple[str, int]:
    parts = urlsplit(base_url)
    if parts.scheme != "http" or not parts.hostname:
        raise BackendUnreachable(f"backend URL {base_url!r} is not http://host:port")
    return parts.hostname, parts.port or 80
