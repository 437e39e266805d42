"""A lean keep-alive HTTP/1.1 client (asyncio streams + httptools): the agent router's
client to its backends and the hub's client to openai upstreams.

Why not httpx: measured on the 2-core test machine against the stand-in server, one small
request cost the caller ~1.0-1.5 ms of CPU through httpx 0.28 (~0.75 ms through httpcore
directly) and ~0.1 ms through this client, and httpx's pool collapsed to 150-350
requests/s at 64 concurrent requests where this client does >1200/s. Both the router and
the hub forward every request, so the client must be cheap. What it does: one pool of idle
connections per origin and TLS context, TLS for https (certifi's CA bundle, as httpx, or
the caller's context per request: the router pins each backend job's own certificate,
`saia.base.pinned_tls`; such a request never goes out as plain HTTP), the request head and
a bytes body in one write (a streamed body, `BodyStream`, piece by piece: an upload passed
on as it arrives), the response parsed by httptools (llhttp, C; installed with
uvicorn[standard]) and handed on chunk by chunk as it arrives (messages and parsing:
`saia.base.http11_messages`). Optionally at most `max_connections` connections are open (a
request waits for one). A pooled connection that the server closed meanwhile (nothing came
back on it) is dropped and a bytes request tries the next pooled one, then a new one, which
is never retried; a streamed body is sent once, on a new connection. No total timeout: the
caller times the first byte and each gap between chunks.

Requests are built from values the caller has validated: method, path (from an allow-list
or configuration), header names (HTTP tokens) and values (no CR/LF/NUL).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from itertools import chain

import certifi

from saia.base.http11_messages import (
    READ_SIZE,
    Body,
    BodyMismatch,
    BodyStream,
    ConnectFailed,
    Connection,
    HttpResponse,
    NoResponse,
    PoolKey,
    ResponseBroken,
    Target,
    encode_request,
    parse_url,
)


class Route:
    """A target and the TLS context to reach it with; pooled connections are per `key`,
    so a connection made under one job's pin never serves another context."""

    __slots__ = ("key", "target", "tls")

    def __init__(self, target: Target, tls: ssl.SSLContext | None) -> None:
        self.target, self.tls = target, tls
        self.key: PoolKey = (target.origin, tls)


__all__ = [
    "Body",
    "BodyMismatch",
    "BodyStream",
    "ConnectFailed",
    "HttpClient",
    "HttpResponse",
    "NoResponse",
    "ResponseBroken",
    "Target",
    "encode_request",
    "parse_url",
]


class HttpClient:
    """Pooled keep-alive connections; `async with` closes them all. `send()` returns a
    response the caller must `release()`; `stream()` does both around a `with` block."""

    def __init__(
        self,
        max_connections: int | None = None,
        keepalive_expiry: float = 30.0,
        tls: ssl.SSLContext | None = None,
        *,
        connect_timeout: float = 10.0,
        max_idle_per_origin: int = 256,
        header_encoding: str = "latin-1",
    ) -> None:
        """`max_connections`: at most this many open (None: no cap); `tls`: the context for
        https (default: certifi's CA bundle, as httpx); `connect_timeout`: the default of
        `send`; `header_encoding` of the request head."""
        self._max = max_connections
        self._slots = None if max_connections is None else asyncio.Semaphore(max_connections)
        self._expiry = keepalive_expiry
        self._connect_timeout = connect_timeout
        self._max_idle_per_origin = max_idle_per_origin
        self._encoding = header_encoding
        self._idle: defaultdict[PoolKey, deque[Connection]] = defaultdict(deque)
        self._idle_count = 0
        self._busy: set[Connection] = set()
        self._targets: dict[str, Target] = {}
        self._tls = tls
        self._swept_at = time.monotonic()

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for connection in [*chain.from_iterable(self._idle.values()), *self._busy]:
            connection.close()
        self._idle.clear()
        self._idle_count = 0
        self._busy.clear()

    @property
    def idle_connections(self) -> int:
        return self._idle_count

    @property
    def busy_connections(self) -> int:
        return len(self._busy)

    def target(self, url: str) -> Target:
        """The parsed URL (cached: upstream and backend URLs are few); ConnectFailed if bad."""
        target = self._targets.get(url)
        if target is None:
            if len(self._targets) > 1024:  # backends come and go: keep it bounded
                self._targets.clear()
            try:
                target = self._targets[url] = parse_url(url)
            except ValueError as error:
                raise ConnectFailed(str(error)) from None
        return target

    async def send(
        self,
        base_url: str,
        method: str,
        path: str,
        headers: list[tuple[str, str]],
        body: Body,
        connect_timeout: float | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> HttpResponse:
        """Send the request to `path` on `base_url`'s origin and return the response head;
        the caller must `release()` it. `tls`: the context of this origin (an https URL
        only: ConnectFailed for http, never a plain fallback); None: the client's. Raises
        ConnectFailed, NoResponse, TimeoutError (waiting for a free connection, as long as
        `connect_timeout`), and for a `BodyStream` what its pieces raise and BodyMismatch."""
        target = self.target(base_url)
        if tls is not None and target.scheme != "https":
            raise ConnectFailed(f"a TLS context needs an https URL, not {base_url!r}")
        data = encode_request(method, path, target.host_header, headers, body, self._encoding)
        stream = None if isinstance(body, bytes) else body
        timeout = connect_timeout or self._connect_timeout
        return await self._send(Route(target, tls), data, stream, timeout)

    @asynccontextmanager
    async def stream(
        self,
        method: str,
        url: str,
        headers: list[tuple[str, str]],
        body: Body,
        connect_timeout: float | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> AsyncIterator[HttpResponse]:
        """Send the request to `url`; the response head on enter; the connection is pooled
        again on exit if the body was read to its end, closed otherwise (error,
        cancellation). Raises as `send`, and ResponseBroken while reading the body."""
        target = self.target(url)
        response = await self.send(url, method, target.path, headers, body, connect_timeout, tls)
        try:
            yield response
        except BaseException:
            self.release(response, reuse=False)
            raise
        self.release(response)

    def release(self, response: HttpResponse, reuse: bool = True) -> None:
        """Back to the pool after a complete exchange; closed otherwise (e.g. cancelled)."""
        if response.released:
            return
        response.released = True
        self._pool(response.connection, reuse)
        if self._slots is not None:
            self._slots.release()

    async def _send(
        self, target: Route, data: bytes, body: BodyStream | None, connect_timeout: float
    ) -> HttpResponse:
        if self._slots is not None:
            if self._slots.locked():  # all connections busy: wait, as long as for a connect
                async with asyncio.timeout(connect_timeout):
                    await self._slots.acquire()
            else:
                await self._slots.acquire()
            try:
                return HttpResponse(await self._exchange(target, data, body, connect_timeout))
            except BaseException:
                self._slots.release()
                raise
        return HttpResponse(await self._exchange(target, data, body, connect_timeout))

    async def _exchange(
        self, target: Route, data: bytes, body: BodyStream | None, connect_timeout: float
    ) -> Connection:
        """A connection whose response head has arrived. A streamed body goes on a new
        connection: a pooled one the server is closing would fail it half-sent."""
        while True:
            connection = await self._acquire(target, connect_timeout, fresh=body is not None)
            self._busy.add(connection)
            try:
                connection.writer.write(data)
                if body is not None:
                    await body.write(connection.writer)
                while not connection.head_done:
                    await connection.receive()
                return connection
            except BaseException as error:
                self._busy.discard(connection)
                connection.close()
                stale = connection.reused and connection.received == 0 and body is None
                if stale and isinstance(error, ResponseBroken | OSError):
                    continue  # the server closed the idle connection: a new one
                if isinstance(error, OSError):
                    raise NoResponse(f"{type(error).__name__}: {error}") from None
                raise

    def _pool(self, connection: Connection, reuse: bool) -> None:
        self._busy.discard(connection)
        self._sweep(time.monotonic())
        pool = self._idle[connection.pool_key]
        if (
            not reuse
            or not connection.reusable()
            or len(pool) >= self._max_idle_per_origin
            or (self._max is not None and self._idle_count + len(self._busy) >= self._max)
        ):
            connection.close()
            return
        connection.reset()
        connection.reused = True
        connection.idle_since = time.monotonic()
        pool.append(connection)
        self._idle_count += 1

    async def _acquire(self, target: Route, connect_timeout: float, fresh: bool) -> Connection:
        pool = None if fresh else self._idle.get(target.key)
        now = time.monotonic()
        while pool:
            connection = pool.pop()
            self._idle_count -= 1
            if now - connection.idle_since < self._expiry and not connection.reader.at_eof():
                return connection
            connection.close()
        busy = len(self._busy)
        if self._max is not None and self._idle_count and self._idle_count + busy >= self._max:
            self._close_oldest_idle()
        return await self._connect(target, connect_timeout)

    def _sweep(self, now: float) -> None:
        """Close idle connections that expired or that the server closed, in every pool
        (at most once a second): backends come and go (each job its own origin and TLS
        pin), and a pool nobody asks for again would keep them, and their sockets, forever."""
        if now - self._swept_at < min(1.0, self._expiry):
            return
        self._swept_at = now
        for key, pool in list(self._idle.items()):
            for connection in [c for c in pool if self._stale(c, now)]:
                pool.remove(connection)
                connection.close()
                self._idle_count -= 1
            if not pool:
                del self._idle[key]

    def _stale(self, connection: Connection, now: float) -> bool:
        return now - connection.idle_since >= self._expiry or connection.reader.at_eof()

    def _close_oldest_idle(self) -> None:
        oldest = min((p for p in self._idle.values() if p), key=lambda p: p[0].idle_since)
        oldest.popleft().close()
        self._idle_count -= 1

    async def _connect(self, route: Route, connect_timeout: float) -> Connection:
        target = route.target
        tls = None
        if target.scheme == "https":
            tls = route.tls or self._tls_context()
        try:
            async with asyncio.timeout(connect_timeout):
                reader, writer = await asyncio.open_connection(
                    target.host,
                    target.port,
                    ssl=tls,
                    server_hostname=target.host if tls else None,
                    limit=READ_SIZE,
                )
        except ssl.SSLCertVerificationError as error:
            whose = "the one pinned for it" if route.tls else "trusted"
            raise ConnectFailed(
                f"TLS: the server's certificate is not {whose} "
                f"(SSLCertVerificationError: {error.verify_message})"
            ) from None
        except (OSError, ssl.SSLError) as error:
            raise ConnectFailed(f"{type(error).__name__}: {error}") from None
        return Connection(route.key, reader, writer)

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context(cafile=certifi.where())
            self._tls.set_alpn_protocols(["http/1.1"])
        return self._tls
