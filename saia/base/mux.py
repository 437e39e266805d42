"""One framed channel carrying many request streams (both ends: hub client and agent router).

The channel owns the byte pipe (an SSH exec channel on the hub, the relay's Unix socket
connection in the agent) and the per-stream flow-control state of `saia.base.protocol`.
Frames are written with one synchronous write each (atomic on one event loop); DATA waits
for the stream's credit and for the pipe to drain, so a slow reader stalls only its stream.
The owner reads with `next_frames()`; WINDOW, PING and PONG never reach it.

Memory a peer can make this end hold, whatever it sends:
- answers it did not ask to be flow controlled (PONG, and whatever the owner sends with
  `answer()`, e.g. refusals): once CONTROL_QUEUE bytes of them were queued, `next_frames()`
  reads nothing more until the pipe has drained (`stalled`; `wait_drained()`), and a peer
  that does not read them within CONTROL_DRAIN_TIMEOUT is a ProtocolError (and its pipe
  is aborted). PONGs of one read add at most READ_SIZE;
- received DATA: at most its stream's window (INITIAL_WINDOW plus returned credit);
  empty DATA frames carry nothing and are dropped;
- frames waiting in one stream's inbox: at most INBOX_FRAMES (ProtocolError beyond);
- the decoder's partial frame: one frame (MAX_DATA or MAX_HEAD) plus one read (READ_SIZE).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Protocol

from saia.base import protocol as wire

log = logging.getLogger(__name__)
READ_SIZE = 256 * 1024
GRANT_THRESHOLD = wire.INITIAL_WINDOW // 4  # return credit in batches, not per chunk
# Unrequested answers queued before reading pauses until the pipe drains: a PING flood from
# a peer that never reads costs at most this plus one read's worth of PONGs.
CONTROL_QUEUE = 64 * 1024
CONTROL_DRAIN_TIMEOUT = 60.0
# Frames one stream's inbox may hold: DATA is bounded in bytes by the window, this bounds
# it in objects (a legitimate stream of small chunks stays far below).
INBOX_FRAMES = 65536


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
    """Frames received for one stream (a lighter asyncio.Queue: one reader)."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[wire.Frame | Lost] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def __len__(self) -> int:
        return len(self._items)

    def put_nowait(self, item: wire.Frame | Lost) -> None:
        """Queue `item`; ProtocolError if the peer filled the inbox (LOST always fits)."""
        if len(self._items) >= INBOX_FRAMES and not isinstance(item, Lost):
            raise wire.ProtocolError(f"more than {INBOX_FRAMES} frames queued on one stream")
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait(self) -> None:
        """Until something is queued, without taking it."""
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def get(self) -> wire.Frame | Lost:
        if not self._items:
            await self.wait()
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
    """Frame I/O and stream table of one connection; the owner calls `next_frames()`."""

    def __init__(self, reader: ByteReader, writer: ByteWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._decoder = wire.FrameDecoder()
        self._pending: deque[wire.Frame] = deque()
        self._outgoing: list[bytes] = []
        self._flush_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failure: wire.ProtocolError | None = None  # raised by the next next_frames()
        self.owed = 0  # bytes of unrequested answers queued since the pipe last drained
        self._abort = False  # the peer does not read: drop what is queued on close
        self.streams: dict[int, StreamState] = {}
        self.closed = False
        self.stalled = False  # reading paused until the peer reads our answers
        self.last_read = time.monotonic()  # when the peer last sent anything (liveness)

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

    def answer(self, frame: bytes) -> None:
        """Queue a frame the peer did not ask to be flow controlled (PONG, a refusal).

        Counted: reading pauses once CONTROL_QUEUE bytes of them wait for the pipe.
        """
        self.owed += len(frame)
        self.send(frame)

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
    async def next_frames(self) -> list[wire.Frame] | None:
        """The owner's frames of the next read (None at EOF); WINDOW, PING, PONG handled here.

        One await per read, not per frame. A violation is raised after the frames before
        it were handed over (by the next call).
        """
        while True:
            if self._failure is not None:
                raise self._failure
            if self._pending:  # left over from read_hello()
                raw = list(self._pending)
                self._pending.clear()
            else:
                if self.owed >= CONTROL_QUEUE:
                    await self.wait_drained()
                data = await self._read()
                if data is None:
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

    async def _read(self) -> bytes | None:
        """The next bytes from the pipe; None at its end (a truncated frame raises)."""
        try:
            data = await self._reader.read(READ_SIZE)
        except (ConnectionError, OSError):
            return None
        if not data:
            self._decoder.finish()
            return None
        self.last_read = time.monotonic()
        return data

    async def wait_drained(self) -> None:
        """Read no more until the peer took our answers (a flood of PINGs it never reads).

        `next_frames()` calls it once `owed` reaches CONTROL_QUEUE; an owner whose frames
        call for answers (refusals) calls it between frames, so that one read of small
        frames cannot queue a multiple of itself.
        """
        self._flush()
        self.stalled = True
        try:
            async with asyncio.timeout(CONTROL_DRAIN_TIMEOUT):
                await self._writer.drain()
        except TimeoutError:
            self._abort = True
            message = f"the peer did not read {self.owed} bytes of answers"
            raise wire.ProtocolError(message) from None
        except (ConnectionError, OSError):
            pass  # the next read sees the end
        finally:
            self.stalled = False
        self.owed = 0

    def _accept(self, frame: wire.Frame) -> bool:
        """Handle WINDOW, PING and PONG; True for the owner's frames (DATA charged)."""
        kind = frame.type
        if kind == wire.DATA:
            return self._charge(frame)
        if kind == wire.WINDOW:
            state = self.streams.get(frame.stream)
            if state is not None:
                state.add_credit(wire.parse_window(frame.payload))
            return False
        if kind == wire.PING:
            self.answer(wire.encode_frame(wire.PONG, 0, frame.payload))
            return False
        return kind != wire.PONG

    def _charge(self, frame: wire.Frame) -> bool:
        """Charge DATA to its stream's window; False for frames that carry nothing."""
        size = len(frame.payload)
        state = self.streams.get(frame.stream)
        if state is not None:
            state.recv_budget -= size
            if state.recv_budget < 0:
                raise wire.ProtocolError(f"stream {frame.stream} sent beyond its window")
        return size > 0

    async def read_hello(self) -> int:
        """The peer's first frame must be HELLO; return its version."""
        while not self._pending:
            data = await self._read()
            if data is None:
                raise wire.ProtocolError("channel closed before HELLO")
            self._pending.extend(self._decoder.feed(data))
        frame = self._pending.popleft()
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
        if self._abort:  # the peer reads nothing: do not keep its answers queued
            transport = getattr(self._writer, "transport", None)
            if transport is not None:
                transport.abort()
        self._writer.close()
