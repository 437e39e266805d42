"""saia.base.mux on a socketpair (no sshd, no agent): flow control, cancellation, closing,
and the memory a hostile peer can make one end hold."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from saia.base import mux
from saia.base import protocol as wire
from saia.base.mux import LOST, Channel, StreamClosed
from tests.hpc.helpers import until
from tests.saia.mux_helpers import next_frame

HIGH_WATER = 64 * 1024  # asyncio's default write-buffer high-water mark


@dataclass
class Raw:
    """The peer's end as plain bytes (a hostile hub or agent writes what it likes)."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def buffered(self) -> int:
        return self.writer.transport.get_write_buffer_size()


@contextlib.asynccontextmanager
async def pair() -> AsyncIterator[tuple[Channel, Raw]]:
    """Our Channel and the raw peer, on a Unix socketpair."""
    ours, theirs = socket.socketpair()
    reader, writer = await asyncio.open_unix_connection(sock=ours)
    peer_reader, peer_writer = await asyncio.open_unix_connection(sock=theirs)
    channel = Channel(reader, writer)
    try:
        yield channel, Raw(peer_reader, peer_writer)
    finally:
        channel.close()
        peer_writer.close()


@contextlib.asynccontextmanager
async def two_ends() -> AsyncIterator[tuple[Channel, Channel]]:
    """Two Channels talking to each other (both sides of the hop use the same mux)."""
    async with pair() as (left, raw):
        right = Channel(raw.reader, raw.writer)
        try:
            yield left, right
        finally:
            right.close()


def written(channel: Channel) -> int:
    """Bytes our end has queued for the peer that the peer has not taken yet."""
    transport = channel._writer.transport  # type: ignore[attr-defined]
    return int(transport.get_write_buffer_size())


async def owner(channel: Channel, into: list[wire.Frame]) -> None:
    """The owner's read loop: every frame it is handed, until EOF."""
    while (frames := await channel.next_frames()) is not None:
        into.extend(frames)


async def count_pongs(raw: Raw, expected: int) -> int:
    decoder, pongs = wire.FrameDecoder(), 0
    async with asyncio.timeout(60):
        while pongs < expected:
            data = await raw.reader.read(1 << 20)
            assert data, "the channel ended before answering every PING"
            pongs += sum(f.type == wire.PONG for f in decoder.feed(data))
    return pongs


async def test_a_ping_flood_never_read_is_answered_within_the_control_budget() -> None:
    pings = 4 * 1024 * 1024 // 18  # 4 MiB of PINGs; the peer reads none of the PONGs
    async with pair() as (channel, raw):
        reading = asyncio.create_task(owner(channel, []))
        raw.writer.write(wire.encode_frame(wire.PING, 0, b"12345678") * pings)
        bound = HIGH_WATER + mux.CONTROL_QUEUE + mux.READ_SIZE
        # Our end stops reading (or, unprotected, queues PONGs past the bound).
        stalled = await until(
            lambda: getattr(channel, "stalled", False) or written(channel) > bound, 30, "-"
        )
        assert written(channel) <= bound
        assert stalled is True and raw.buffered() > 0  # the rest waits at the peer
        # Once the peer reads, reading resumes and every PING is answered: none lost.
        assert await count_pongs(raw, pings) == pings
        assert not channel.stalled
        reading.cancel()


async def test_a_peer_that_never_reads_its_answers_is_cut_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(mux, "CONTROL_DRAIN_TIMEOUT", 0.5)
    async with pair() as (channel, raw):
        raw.writer.write(wire.encode_frame(wire.PING, 0, b"12345678") * 200_000)
        with pytest.raises(wire.ProtocolError, match="did not read"):
            async with asyncio.timeout(30):
                await owner(channel, [])
        channel.close()
        assert written(channel) == 0  # what it did not read is dropped, not kept


async def test_data_beyond_the_window_is_a_protocol_error() -> None:
    async with pair() as (channel, raw):
        channel.open(1)
        chunk = b"x" * wire.MAX_DATA
        for _ in range(wire.INITIAL_WINDOW // wire.MAX_DATA):
            raw.writer.write(wire.encode_data(1, chunk))
        raw.writer.write(wire.encode_data(1, b"y"))
        got: list[wire.Frame] = []
        with pytest.raises(wire.ProtocolError, match="beyond its window"):
            async with asyncio.timeout(10):
                await owner(channel, got)
        assert sum(len(f.payload) for f in got) == wire.INITIAL_WINDOW  # all before it


async def test_empty_data_frames_are_not_queued() -> None:
    async with pair() as (channel, raw):
        state = channel.open(1)
        raw.writer.write(wire.encode_data(1, b"") * 10_000 + wire.encode_data(1, b"z"))
        async with asyncio.timeout(10):
            frame = await next_frame(channel)
        assert frame is not None and frame.payload == b"z"
        assert state.recv_budget == wire.INITIAL_WINDOW - 1


async def test_an_inbox_the_peer_floods_is_a_protocol_error() -> None:
    async with pair() as (channel, _raw):
        inbox = channel.open(1).inbox
        end = wire.Frame(wire.END, 1, b"")
        for _ in range(mux.INBOX_FRAMES):
            inbox.put_nowait(end)
        with pytest.raises(wire.ProtocolError, match="frames queued"):
            inbox.put_nowait(end)
        inbox.put_nowait(LOST)  # closing always gets through
        assert len(inbox) == mux.INBOX_FRAMES + 1


async def test_a_sender_waits_for_credit_and_resumes_on_window() -> None:
    size = wire.INITIAL_WINDOW + wire.MAX_DATA + 5
    async with two_ends() as (left, right):
        sender, receiver = left.open(1), right.open(1)
        sending = asyncio.create_task(left.send_data(sender, b"d" * size))
        got: list[wire.Frame] = []
        reading = asyncio.create_task(owner(right, got))
        windows = asyncio.create_task(owner(left, []))  # handles the WINDOW frames

        def received() -> int:
            return sum(len(f.payload) for f in got)

        await until(lambda: received() == wire.INITIAL_WINDOW, 10, "no first window")
        assert sender.credit == 0 and not sending.done()  # credit is spent: it must wait
        right.consumed(receiver, received())  # the application took it: credit goes back
        await until(lambda: received() == size, 10, "the rest never came")
        async with asyncio.timeout(10):
            await sending
        assert receiver.recv_budget == wire.INITIAL_WINDOW - (size - wire.INITIAL_WINDOW)
        reading.cancel()
        windows.cancel()


async def test_a_cancelled_writer_and_reader_leave_nothing_behind() -> None:
    async with two_ends() as (left, right):
        state = left.open(1)
        right.open(1)
        got: list[wire.Frame] = []
        reading = asyncio.create_task(owner(right, got))
        sending = asyncio.create_task(left.send_data(state, b"d" * (2 * wire.INITIAL_WINDOW)))
        await until(lambda: state.credit == 0 and len(got) >= 4, 10, "window not spent")
        sending.cancel()
        reading.cancel()
        await asyncio.gather(sending, reading, return_exceptions=True)
        left.discard(state)
        assert left.streams == {}
        assert asyncio.all_tasks() == {asyncio.current_task()}
        # The cancelled read lost nothing: the same channel still reads what follows.
        left.send(wire.encode_end(1))
        async with asyncio.timeout(10):
            frame = await next_frame(right)
        assert frame is not None and frame.type == wire.END


async def test_closing_wakes_every_waiter() -> None:
    async with two_ends() as (left, right):
        inbox_state, credit_state = left.open(1), left.open(3)
        credit_state.credit = 0
        inbox_waiter = asyncio.create_task(inbox_state.inbox.get())
        credit_waiter = asyncio.create_task(left.send_data(credit_state, b"x"))
        peer_reader = asyncio.create_task(owner(right, []))
        await until(lambda: inbox_state.inbox._waiter is not None, 5, "inbox not awaited")
        left.close()
        async with asyncio.timeout(10):
            assert await inbox_waiter is LOST
            with pytest.raises(StreamClosed):
                await credit_waiter
            await peer_reader  # the peer sees the end of the channel
        assert left.streams == {}
        with pytest.raises(StreamClosed):
            left.open(5)
