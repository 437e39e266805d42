"""A lean keep-alive HTTP/1.1 client for the router's backend requests (h11 on asyncio).

Why not httpx: measured on the 2-core test machine, httpx 0.28's pool collapsed from ~500
to 50-250 requests/s at 64 concurrent requests to the stand-in server, where plain asyncio
connections kept ~1000/s (bench/hop.py). The router forwards every request, so it uses this
small client: one pool of idle connections per backend address, one write per request, no
total timeout (the caller times the first byte and each gap between chunks).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import h11

READ_SIZE = 256 * 1024
IDLE_EXPIRY = 30.0  # close pooled connections unused this long (backends drop them too)


class BackendUnreachable(Exception):
    """No response byte came back (refused, reset, closed): another backend may take it."""


class BackendBroken(Exception):
    """The backend broke the exchange after the response started."""


@dataclass(eq=False)
class _Connection:
    address: tuple[str, int]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    protocol: h11.Connection = field(default_factory=lambda: h11.Connection(h11.CLIENT))
    idle_since: float = 0.0
    reused: bool = False

    def close(self) -> None:
        self.writer.close()


@dataclass
class BackendResponse:
    status: int
    headers: list[tuple[str, str]]
    _connection: _Connection
    _done: bool = False

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (de-chunked); raises BackendBroken if it breaks off."""
        while not self._done:
            event = await _next_event(self._connection, broken=BackendBroken)
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._done = True


async def _next_event(connection: _Connection, broken: type[Exception]) -> h11.Event:
    protocol = connection.protocol
    while True:
        try:
            event = protocol.next_event()
        except h11.RemoteProtocolError as error:
            raise broken(f"invalid HTTP from the backend: {error}") from None
        if event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
            raise broken("the backend closed the connection")
        if event is not h11.NEED_DATA:
            return event  # type: ignore[return-value]
        try:
            data = await connection.reader.read(READ_SIZE)
        except (ConnectionError, OSError) as error:
            raise broken(f"connection to the backend failed: {error}") from None
        protocol.receive_data(data)


class BackendHttp:
    """Keep-alive connections to backends; owned by `serve_requests` (`async with`)."""

    def __init__(self, connect_timeout: float, max_idle_per_backend: int = 256) -> None:
        self._connect_timeout = connect_timeout
        self._max_idle = max_idle_per_backend
        self._idle: dict[tuple[str, int], deque[_Connection]] = {}
        self._busy: set[_Connection] = set()

    async def __aenter__(self) -> BackendHttp:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for pool in self._idle.values():
            for connection in pool:
                connection.close()
        self._idle.clear()
        for connection in self._busy:
            connection.close()

    async def send(
        self,
        base_url: str,
        method: str,
        path: str,
        headers: list[tuple[str, str]],
        body: bytes,
    ) -> BackendResponse:
        """Send the request and return the response head; the caller must `release()` it."""
        address = _address(base_url)
        connection, response = await self._exchange(address, method, path, headers, body)
        self._busy.add(connection)
        return response

    def release(self, response: BackendResponse) -> None:
        """Back to the pool after a complete exchange; closed otherwise (e.g. cancelled)."""
        connection = response._connection
        self._busy.discard(connection)
        protocol = connection.protocol
        complete = protocol.our_state is h11.DONE and protocol.their_state is h11.DONE
        pool = self._idle.setdefault(connection.address, deque())
        if not complete or len(pool) >= self._max_idle:
            connection.close()
            return
        protocol.start_next_cycle()
        connection.idle_since = time.monotonic()
        pool.append(connection)

    async def _exchange(
        self,
        address: tuple[str, int],
        method: str,
        path: str,
        headers: list[tuple[str, str]],
        body: bytes,
    ) -> tuple[_Connection, BackendResponse]:
        host_header = f"{address[0]}:{address[1]}"
        request = h11.Request(
            method=method,
            target=path,
            headers=[("host", host_header), ("content-length", str(len(body))), *headers],
        )
        while True:  # a pooled connection may have been closed by the backend meanwhile
            connection = await self._acquire(address)
            protocol = connection.protocol
            try:
                data = protocol.send(request) or b""
                data += (protocol.send(h11.Data(data=body)) or b"") if body else b""
                connection.writer.write(data + (protocol.send(h11.EndOfMessage()) or b""))
                event = await _next_event(connection, broken=BackendUnreachable)
                while isinstance(event, h11.InformationalResponse):  # 1xx: the real one follows
                    event = await _next_event(connection, broken=BackendUnreachable)
            except (BackendUnreachable, ConnectionError, OSError) as error:
                connection.close()
                if connection.reused:
                    continue
                raise BackendUnreachable(str(error) or type(error).__name__) from None
            except BaseException:
                connection.close()
                raise
            if not isinstance(event, h11.Response):
                connection.close()
                raise BackendUnreachable(f"unexpected {type(event).__name__} from the backend")
            decoded = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers]
            return connection, BackendResponse(event.status_code, decoded, connection)

    async def _acquire(self, address: tuple[str, int]) -> _Connection:
        pool = self._idle.get(address)
        now = time.monotonic()
        while pool:
            connection = pool.pop()
            if now - connection.idle_since < IDLE_EXPIRY and not connection.reader.at_eof():
                connection.reused = True
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


def _address(base_url: str) -> tuple[str, int]:
    parts = urlsplit(base_url)
    if parts.scheme != "http" or not parts.hostname:
        raise BackendUnreachable(f"backend URL {base_url!r} is not http://host:port")
    return parts.hostname, parts.port or 80
