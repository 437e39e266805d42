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
from typing import Any, ClassVar

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from hub.config import ClientTimeoutsConfig
from hub.errors import error_body

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024  # request line and headers (nginx's default allows 32 KiB)


def _error_answer(status: int, reason: str, message: str, code: str) -> bytes:
    """A whole HTTP answer with OpenAI's error JSON, written where no ASGI app answers."""
    body = json.dumps(error_body(status, message, code=code)).encode()
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"connection: close\r\n\r\n%s" % (status, reason.encode(), len(body), body)
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


class BoundedHttpProtocol(HttpToolsProtocol):
    """One connection; one timer at a time: the head's, or the body's while one arrives."""

    timeouts: ClassVar[ClientTimeoutsConfig] = ClientTimeoutsConfig()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._in_head = False  # between a request's first byte and the end of its head
        self._head_bytes = 0
        self._chunk_size = 0  # of the data being parsed
        self._in_body = False
        self._last_piece = 0.0  # loop time of the last body piece
        self._body_deadline = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.timeouts.head)  # the first head counts from the opening

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._chunk_size = len(data)
        super().data_received(data)
        if self._in_head and not self.transport.is_closing():
            # Counted after parsing: only data that left the head unfinished, and not the
            # piece the head began in (it may end a pipelined body; asyncio reads <= 256 KiB).
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                log.info("refused a request from %s: head too large", self._peer())
                self.transport.write(HEAD_TOO_LARGE)
                self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes = True, -self._chunk_size
        if self._timer is None:  # a later request's head counts from its first byte
            self._arm(self.timeouts.head)

    def on_headers_complete(self) -> None:
        self._disarm()
        self._in_head = False
        super().on_headers_complete()
        now = self.loop.time()
        self._in_body = True
        self._last_piece = now
        self._body_deadline = now + self.timeouts.body
        self._arm(min(self.timeouts.body_idle, self.timeouts.body))

    def on_body(self, body: bytes) -> None:
        self._last_piece = self.loop.time()
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        self._in_body = False
        super().on_message_complete()

    def _arm(self, delay: float) -> None:
        self._timer = self.loop.call_later(delay, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if not self._in_body:
            log.info("closed a connection from %s: request head too slow", self._peer())
            self.transport.close()
            return
        now = self.loop.time()
        cycle = self.cycle
        if self.flow.read_paused or (cycle is not None and cycle.waiting_for_100_continue):
            # The hub is not reading (the app has not taken the body so far, or not yet
            # asked for it after `Expect: 100-continue`): the client is not the slow one.
            self._last_piece = now
            self._arm(self.timeouts.body_idle)
            return
        due = min(self._last_piece + self.timeouts.body_idle, self._body_deadline)
        if now < due:
            self._arm(due - now)
            return
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
    )
