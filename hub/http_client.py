"""A lean keep-alive HTTP/1.1 client for the openai upstreams (asyncio streams + httptools).

Why not httpx: measured on the 2-core test machine against the stand-in server, one small
request cost the caller ~1.0 ms of CPU through httpx 0.28 (~0.75 ms through httpcore
directly) and ~0.1 ms through this client, and the hub forwards every request. What it
does: one pool of idle connections per origin, TLS (certifi's CA bundle, as httpx), the
request head and body in one write, the response parsed by httptools (llhttp, C; installed
with uvicorn[standard]) and handed on chunk by chunk as it arrives. At most
`max_connections` connections are open; a request waits for one. A pooled connection that
the server closed meanwhile is replaced once before anything came back. No total timeout:
the caller times the first byte and each gap between chunks.

Requests are built from values the hub controls: method, path (from the configured base
URL and the endpoint allow-list) and header values checked for CR/LF/NUL by the caller.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import certifi
import httptools

READ_SIZE = 64 * 1024
MAX_HEAD = 256 * 1024  # bytes before the end of the response head
_DEFAULT_PORTS = {"http": 80, "https": 443}


class ConnectFailed(Exception):
    """No connection to the server (refused, unreachable, TLS): nothing was sent."""


class ResponseBroken(Exception):
    """The exchange broke after the request was sent (reset, closed, invalid HTTP)."""


@dataclass(frozen=True)
class Target:
    """Where a URL points: the connection's origin and the request line's target."""

    scheme: str
    host: str
    port: int
    path: str  # path and query, e.g. /v1/chat/completions?x=1

    @property
    def origin(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)

    @property
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
    method: str, target: Target, headers: list[tuple[str, str]], body: bytes
) -> bytes:
    lines = [f"{method} {target.path} HTTP/1.1", f"host: {target.host_header}"]
    lines.append(f"content-length: {len(body)}")
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class _Connection:
    """One TCP (or TLS) connection and the parser state of its current response."""

    def __init__(
        self,
        origin: tuple[str, str, int],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.origin = origin
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
        try:
            data = await self.reader.read(READ_SIZE)
        except OSError as error:
            raise ResponseBroken(f"{type(error).__name__}: {error}") from None
        if not data:
            if self.head_done and self.until_eof and not self.complete:
                self.complete, self.keep_alive = True, False
                return
            raise ResponseBroken("the server closed the connection")
        self.received += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as error:
            raise ResponseBroken(f"invalid HTTP: {error}") from None
        if not self.head_done and self.received > MAX_HEAD:
            raise ResponseBroken("the response head is too large")

    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.body and not self.reader.at_eof()

    def close(self) -> None:
        self.writer.close()


class HttpResponse:
    """The response head; `chunks(idle)` streams the (de-chunked) body as it arrives."""

    def __init__(self, connection: _Connection) -> None:
        self.status = connection.parser.get_status_code()
        self.headers = connection.headers
        self._connection = connection

    async def chunks(self, idle: float) -> AsyncIterator[bytes]:
        """Raises ResponseBroken if the body breaks off, TimeoutError if nothing arrives for
        `idle` seconds (timed only while waiting: most small answers are complete at once)."""
        connection = self._connection
        while True:
            while connection.body:
                yield connection.body.popleft()
            if connection.complete:
                return
            async with asyncio.timeout(idle):
                await connection.receive()


class HttpClient:
    """Pooled keep-alive connections; `async with` closes them all."""

    def __init__(
        self, max_connections: int, keepalive_expiry: float, tls: ssl.SSLContext | None = None
    ) -> None:
        """`tls`: the context for https (default: certifi's CA bundle, as httpx)."""
        self._max = max_connections
        self._expiry = keepalive_expiry
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: dict[tuple[str, str, int], deque[_Connection]] = {}
        self._idle_count = 0
        self._busy: set[_Connection] = set()
        self._targets: dict[str, Target] = {}
        self._tls = tls

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for pool in self._idle.values():
            for connection in pool:
                connection.close()
        self._idle.clear()
        self._idle_count = 0
        for connection in self._busy:
            connection.close()
        self._busy.clear()

    def target(self, url: str) -> Target:
        """The parsed URL (cached: upstream URLs are few)."""
        target = self._targets.get(url)
        if target is None:
            if len(self._targets) > 1024:
                self._targets.clear()
            target = self._targets[url] = parse_url(url)
        return target

    @asynccontextmanager
    async def stream(
        self,
        method: str,
        url: str,
        headers: list[tuple[str, str]],
        body: bytes,
        connect_timeout: float,
    ) -> AsyncIterator[HttpResponse]:
        """Send the request; the response head on enter; the connection is pooled again
        on exit if the body was read to its end, closed otherwise (error, cancellation).
        Raises ConnectFailed, ResponseBroken, or TimeoutError (connect or pool wait)."""
        target = self.target(url)
        data = encode_request(method, target, headers, body)
        if self._slots.locked():  # all connections busy: wait, as long as for a connect
            async with asyncio.timeout(connect_timeout):
                await self._slots.acquire()
        else:
            await self._slots.acquire()
        try:
            connection = await self._exchange(target, data, connect_timeout)
            try:
                yield HttpResponse(connection)
            except BaseException:
                self._busy.discard(connection)
                connection.close()
                raise
            self._release(connection)
        finally:
            self._slots.release()

    async def _exchange(self, target: Target, data: bytes, connect_timeout: float) -> _Connection:
        """A connection whose response head has arrived."""
        while True:
            connection = await self._acquire(target, connect_timeout)
            self._busy.add(connection)
            try:
                connection.writer.write(data)
                while not connection.head_done:
                    await connection.receive()
                return connection
            except BaseException as error:
                self._busy.discard(connection)
                connection.close()
                stale = connection.reused and connection.received == 0
                if stale and isinstance(error, ResponseBroken | OSError):
                    continue  # the server closed the idle connection: a new one
                if isinstance(error, OSError):
                    raise ResponseBroken(f"{type(error).__name__}: {error}") from None
                raise

    def _release(self, connection: _Connection) -> None:
        self._busy.discard(connection)
        if not connection.reusable() or self._idle_count + len(self._busy) >= self._max:
            connection.close()
            return
        connection.reset()
        connection.reused = True
        connection.idle_since = time.monotonic()
        self._idle.setdefault(connection.origin, deque()).append(connection)
        self._idle_count += 1

    async def _acquire(self, target: Target, connect_timeout: float) -> _Connection:
        pool = self._idle.get(target.origin)
        now = time.monotonic()
        while pool:
            connection = pool.pop()
            self._idle_count -= 1
            if now - connection.idle_since < self._expiry and not connection.reader.at_eof():
                return connection
            connection.close()
        if self._idle_count and self._idle_count + len(self._busy) >= self._max:
            self._close_oldest_idle()
        return await self._connect(target, connect_timeout)

    def _close_oldest_idle(self) -> None:
        pools = [pool for pool in self._idle.values() if pool]
        oldest = min(pools, key=lambda pool: pool[0].idle_since)
        oldest.popleft().close()
        self._idle_count -= 1

    async def _connect(self, target: Target, connect_timeout: float) -> _Connection:
        tls = self._tls_context() if target.scheme == "https" else None
        try:
            async with asyncio.timeout(connect_timeout):
                reader, writer = await asyncio.open_connection(
                    target.host,
                    target.port,
                    ssl=tls,
                    server_hostname=target.host if tls else None,
                    limit=READ_SIZE,
                )
        except (OSError, ssl.SSLError) as error:
            raise ConnectFailed(f"{type(error).__name__}: {error}") from None
        return _Connection(target.origin, reader, writer)

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context(cafile=certifi.where())
            self._tls.set_alpn_protocols(["http/1.1"])
        return self._tls
