"""How the hub is served: the uvicorn settings `saia hub serve` and the tests share.

uvicorn bounds only the silence between two requests on a connection (`timeout_keep_alive`,
armed once an answer is sent): a client that sends its request head or body a byte at a
time holds a connection, and the app's task waiting for that body, as long as it likes.
`BoundedHttpProtocol` is uvicorn's httptools protocol with a deadline per phase of the
request (`client_timeouts` in the config): the head, the gap between body pieces, and the
whole body. A late head closes the connection; a late body gets 408 when no answer has
started yet, then the connection closes (the app sees the client disconnect). A head larger
than MAX_HEAD_BYTES gets 431: httptools itself buffers a header of any size.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, ClassVar, Literal

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from hub.config import ClientTimeoutsConfig
from hub.errors import error_body

log = logging.getLogger(__name__)
# On SIGTERM, requests in flight get this long to finish; then they are cut (and recorded
# as 499 with the tokens so far) so that the usage flush at exit always happens, inside a
# service manager's stop timeout (Docker's default is 10 s: set 30 s, docs/operations.md).
SHUTDOWN_GRACE = 10  # seconds (uvicorn takes an int)

MAX_HEAD_BYTES = 64 * 1024  # request line and headers (nginx's default allows 32 KiB)


def _error_answer(status: int, reason: str, message: str, code: str) -> bytes:
    """A whole HTTP answer with OpenAI's error JSON, written where no ASGI app answers."""
    body = json.dumps(error_body(status, message, code=code)).encode()
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"x-content-type-options: nosniff\r\nconnection: close\r\n\r\n%s"
        % (status, reason.encode(), len(body), body)
    )


REQUEST_TIMEOUT = _error_answer(
    408, "Request Timeout", "the request body did not arrive in time", "request_timeout"
)
HEAD_TOO_LARGE = _error_answer(
    431,
    "Request Header Fields Too Large",
    f"the request line and headers exceed {MAX_HEAD_BYTES} bytes",
    "header_too_large",
)


class CoalescingTransport:
    """The connection's transport, with the writes of one loop iteration sent as one.

    uvicorn writes an answer's head and its body separately: two sends, and on loopback or
    a proxy two wake-ups of the reader, where one does (python -m bench: the send of the
    head alone was a sixth of the hub's CPU at 64 concurrent requests). The writes go out
    at the end of the iteration they were made in (`call_soon`), in order; `close()` sends
    what waits first. Everything else is the transport's.
    """

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._waiting: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._waiting:
            self._loop.call_soon(self.flush)
        self._waiting.append(data)

    def flush(self) -> None:
        waiting = self._waiting
        if waiting:
            data = waiting[0] if len(waiting) == 1 else b"".join(waiting)
            waiting.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class BoundedHttpProtocol(HttpToolsProtocol):
    """One connection. The phase deadlines are plain numbers set as the request arrives; one
    timer per connection checks them when it fires and is re-armed only then (a timer per
    phase doubled the CPU this class adds per request: +7 vs +3.5 us, bench/slow_clients.py)."""

    timeouts: ClassVar[ClientTimeoutsConfig] = ClientTimeoutsConfig()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._phase: Literal["head", "body", None] = None
        self._head_deadline = 0.0
        self._body_deadline = 0.0
        self._last_piece = 0.0  # loop time of the last body piece
        self._head_bytes = 0
        self._chunk_size = 0  # of the data being parsed

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        coalescing = CoalescingTransport(transport, self.loop)
        super().connection_made(coalescing)  # type: ignore[arg-type]
        self._head_begins()  # the first head counts from the opening

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._chunk_size = len(data)
        super().data_received(data)
        if self._phase == "head" and not self.transport.is_closing():
            # Counted after parsing: only data that left the head unfinished, and not the
            # piece the head began in (it may end a pipelined body; asyncio reads <= 256 KiB).
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                log.info("refused a request from %s: head too large", self._peer())
                self.transport.write(HEAD_TOO_LARGE)
                self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._phase != "head":  # a later request's head counts from its first byte
            self._head_begins()
        self._head_bytes = -self._chunk_size

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        now = self.loop.time()
        self._phase, self._last_piece = "body", now
        self._body_deadline = now + self.timeouts.body
        self._watch(min(now + self.timeouts.body_idle, self._body_deadline))

    def on_body(self, body: bytes) -> None:
        self._last_piece = self.loop.time()
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._phase = None
        super().on_message_complete()

    def _head_begins(self) -> None:
        self._phase = "head"
        self._head_deadline = self.loop.time() + self.timeouts.head
        self._watch(self._head_deadline)

    def _watch(self, deadline: float) -> None:
        """Make the timer fire no later than `deadline` (usually it already does)."""
        if self._timer is None or self._timer_at > deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_at(deadline, self._expired)
            self._timer_at = deadline

    def _due(self) -> float | None:
        if self._phase == "head":
            return self._head_deadline
        if self._phase != "body":
            return None
        cycle = self.cycle
        if self.flow.read_paused or (cycle is not None and cycle.waiting_for_100_continue):
            # The hub is not reading (the app has not taken the body so far, or not yet
            # asked for it after `Expect: 100-continue`): the client is not the slow one.
            self._last_piece = self.loop.time()
            return self._last_piece + self.timeouts.body_idle
        return min(self._last_piece + self.timeouts.body_idle, self._body_deadline)

    def _expired(self) -> None:
        self._timer = None
        due = self._due()
        if due is None or self.transport.is_closing():
            return  # between requests: uvicorn's keep-alive timer bounds that
        if self.loop.time() < due:
            self._watch(due)
        elif self._phase == "head":
            log.info("closed a connection from %s: request head too slow", self._peer())
            self.transport.close()
        else:
            self._body_timeout()

    def _body_timeout(self) -> None:
        log.info("closed a connection from %s: request body too slow", self._peer())
        cycle = self.cycle
        if cycle is not None:
            if not cycle.response_started:
                self.transport.write(REQUEST_TIMEOUT)
            # The app's receive() now returns http.disconnect and its sends are dropped.
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "?"


def bounded_protocol(timeouts: ClientTimeoutsConfig) -> type[BoundedHttpProtocol]:
    """The protocol class with these bounds (uvicorn creates one instance per connection)."""

    class Bounded(BoundedHttpProtocol):
        pass

    Bounded.timeouts = timeouts
    return Bounded


def uvicorn_config(
    app: Any,
    host: str,
    port: int,
    log_level: str = "info",
    client_timeouts: ClientTimeoutsConfig | None = None,
) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        server_header=False,
        # The hub judges the direct peer against auth.trusted_proxies itself; uvicorn's
        # X-Forwarded-For rewriting would let a client forge a trusted address.
        proxy_headers=False,
        http=bounded_protocol(client_timeouts or ClientTimeoutsConfig()),
        # The hub has no WebSocket routes; an upgraded connection would leave the bounded
        # protocol (and its timer would close the connection under the new one).
        ws="none",
        timeout_graceful_shutdown=SHUTDOWN_GRACE,
    )
