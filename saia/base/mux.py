"""One framed channel carrying many request streams (both ends: hub client and agent router).

The channel owns the byte pipe (an SSH exec channel on the hub, the relay's Unix socket
connection in the agent) and the per-stream flow-control state of `saia.base.protocol`.
Frames are written with one synchronous write each (atomic on one event loop); DATA waits
for the stream's credit and for the pipe to drain, so a slow reader stalls only its stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Protocol

from saia.base import protocol as wire

log = logging.getLogger(__name__)
READ_SIZE = 256 * 1024
GRANT_THRESHOLD = wire.INITIAL_WINDOW // 4  # return credit in batches, not per chunk


class ByteReader(Protocol):
    async def read(self, n: int = -1) -> bytes: ...


class ByteWriter(Protocol):
    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def close(self) -> None: ...


class StreamClosed(Exception):
    """The stream (or the whole channel) ended while sending on it."""


class Lost:
    """Put into a stream's inbox when the channel ends before the stream did."""


LOST = Lost()


class Inbox:
    """Frames received for one stream (a lighter asyncio.Queue: one reader, no bound)."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[wire.Frame | Lost] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: wire.Frame | Lost) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> wire.Frame | Lost:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()


class StreamState:
    """One stream's inbox and its credit in both directions."""

    __slots__ = ("_credit_changed", "credit", "id", "inbox", "recv_budget", "task", "unacked")

    def __init__(self, stream_id: int) -> None:
        self.id = stream_id
        self.inbox = Inbox()
        self.credit = wire.INITIAL_WINDOW  # bytes we may still send
        self.recv_budget = wire.INITIAL_WINDOW  # bytes the peer may still send
        self.unacked = 0  # consumed bytes not yet returned as credit
        self.task: asyncio.Task[None] | None = None
        self._credit_changed: asyncio.Event | None = None  # made when a sender must wait

    def add_credit(self, increment: int) -> None:
        self.credit += increment
        self.wake()

    async def wait_credit(self) -> None:
        if self._credit_changed is None:
            self._credit_changed = asyncio.Event()
        self._credit_changed.clear()
        await self._credit_changed.wait()

    def wake(self) -> None:
        if self._credit_changed is not None:
            self._credit_changed.set()


class Channel:
    """Frame I/O and stream table of one connection; the owner runs `frames()`."""

    def __init__(self, reader: ByteReader, writer: ByteWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._decoder = wire.FrameDecoder()
        self._pending: deque[wire.Frame] = deque()
        self._outgoing: list[bytes] = []
        self._flush_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failure: wire.ProtocolError | None = None  # raised by the next next_frames()
        self.streams: dict[int, StreamState] = {}
        self.closed = False

    # -- sending ----------------------------------------------------------------------
    def send(self, frame: bytes) -> None:
        """Queue a frame; all frames queued in one loop iteration go out in one write.

        Coalescing matters: on the hub every write is an SSH packet (encrypted in Python),
        and each write costs the relay a wake-up; a request is REQUEST+DATA+END, and many
        streams answer at once.
        """
        if self.closed:
            return
        self._outgoing.append(frame)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._outgoing and not self.closed:
            data = b"".join(self._outgoing)
            self._outgoing.clear()
            self._writer.write(data)

    async def send_data(self, state: StreamState, data: bytes) -> None:
        """Send `data` on the stream within its credit; raise StreamClosed if it ended."""
        size = len(data)
        if 0 < size <= state.credit and size < wire.MAX_DATA and len(self._outgoing) < 64:
            # The usual case (one small chunk within credit): one frame, no slicing.
            if self.closed or self.streams.get(state.id) is not state:
                raise StreamClosed
            state.credit -= size
            self.send(wire.encode_data(state.id, data))
            await self.drain()
            return
        view = memoryview(data)
        while view:
            while state.credit <= 0:
                if self.closed or self.streams.get(state.id) is not state:
                    raise StreamClosed
                await state.wait_credit()
            if self.closed or self.streams.get(state.id) is not state:
                raise StreamClosed
            size = min(len(view), state.credit, wire.MAX_DATA)
            state.credit -= size
            self.send(wire.encode_data(state.id, bytes(view[:size])))
            view = view[size:]
            if len(self._outgoing) > 64 or size == wire.MAX_DATA:
                self._flush()  # large transfers: hand over now so drain() sees them
            await self.drain()

    async def drain(self) -> None:
        try:
            await self._writer.drain()
        except (ConnectionError, BrokenPipeError, OSError) as error:
            raise StreamClosed from error

    def consumed(self, state: StreamState, size: int) -> None:
        """The application took `size` received bytes: return credit in batches."""
        state.unacked += size
        if state.unacked >= GRANT_THRESHOLD and self.streams.get(state.id) is state:
            self.send(wire.encode_window(state.id, state.unacked))
            state.recv_budget += state.unacked
            state.unacked = 0

    # -- streams ----------------------------------------------------------------------
    def open(self, stream_id: int) -> StreamState:
        if self.closed:
            raise StreamClosed
        state = StreamState(stream_id)
        self.streams[stream_id] = state
        return state

    def discard(self, state: StreamState) -> None:
        if self.streams.get(state.id) is state:
            del self.streams[state.id]
        state.wake()

    # -- receiving --------------------------------------------------------------------
    async def next_frame(self) -> wire.Frame | None:
        """The next frame for the owner (None at EOF); WINDOW and PING are handled here."""
        while (frame := await self._next_raw()) is not None:
            if self._accept(frame):
                return frame
        return None

    async def next_frames(self) -> list[wire.Frame] | None:
        """The owner's frames of the next read (None at EOF): `next_frame` in batches.

        One await per read instead of two per frame. A violation is raised after the
        frames before it were handed over, as with `next_frame`.
        """
        while True:
            if self._failure is not None:
                raise self._failure
            if self._pending:  # left over from next_frame()
                raw = list(self._pending)
                self._pending.clear()
            else:
                try:
                    data = await self._reader.read(READ_SIZE)
                except (ConnectionError, OSError):
                    return None
                if not data:
                    self._decoder.finish()
                    return None
                raw = self._decoder.feed(data)
            frames = []
            try:
                for frame in raw:
                    if self._accept(frame):
                        frames.append(frame)
            except wire.ProtocolError as error:
                if not frames:
                    raise
                self._failure = error
            if frames:
                return frames

    def _accept(self, frame: wire.Frame) -> bool:
        """Handle WINDOW, PING and PONG; True for the owner's frames (DATA charged)."""
        kind = frame.type
        if kind == wire.DATA:
            self._charge(frame)
            return True
        if kind == wire.WINDOW:
            state = self.streams.get(frame.stream)
            if state is not None:
                state.add_credit(wire.parse_window(frame.payload))
            return False
        if kind == wire.PING:
            self.send(wire.encode_frame(wire.PONG, 0, frame.payload))
            return False
        return kind != wire.PONG

    async def _next_raw(self) -> wire.Frame | None:
        while not self._pending:
            try:
                data = await self._reader.read(READ_SIZE)
            except (ConnectionError, OSError):
                return None
            if not data:
                self._decoder.finish()
                return None
            self._pending.extend(self._decoder.feed(data))
        return self._pending.popleft()

    def _charge(self, frame: wire.Frame) -> None:
        state = self.streams.get(frame.stream)
        if state is None:
            return
        state.recv_budget -= len(frame.payload)
        if state.recv_budget < 0:
            raise wire.ProtocolError(f"stream {frame.stream} sent beyond its window")

    async def read_hello(self) -> int:
        """The peer's first frame must be HELLO; return its version."""
        frame = await self._next_raw()
        if frame is None:
            raise wire.ProtocolError("channel closed before HELLO")
        if frame.type != wire.HELLO:
            raise wire.ProtocolError(f"expected HELLO, got {wire.describe(frame)}")
        return wire.parse_hello(frame.payload)

    def close(self) -> None:
        """End the channel: every open stream learns it was lost."""
        if self.closed:
            return
        self._flush()  # e.g. an ERROR frame queued just before closing
        self.closed = True
        for state in list(self.streams.values()):
            state.inbox.put_nowait(LOST)
            state.wake()
        self.streams.clear()
        self._writer.close()
