"""A hop link that goes silent while requests wait on it is PINGed, and closed when the
PING goes unanswered (hub/upstreams/hop_link.py, Link.watch): a half-open connection (a
stopped relay or agent, a dead NAT entry: sshd may still answer SSH keepalives) must not
hold requests until their own timeouts. Fast: a socketpair, the real Channel on both ends.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from hub.upstreams.hop_link import Link
from saia.base import protocol as wire
from saia.base.mux import Channel

AFTER, ANSWER_WITHIN = 0.2, 0.4
Peer = tuple[asyncio.StreamReader, asyncio.StreamWriter]  # the agent's end, raw


class Connection:
    """The Link's transport: here only closing matters."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.closed = False

    def close(self) -> None:
        self.closed = True
        self.writer.close()

    async def wait_closed(self) -> None:
        return None


@asynccontextmanager
async def link_and_peer() -> AsyncIterator[tuple[Link, Connection, Peer]]:
    ours, theirs = socket.socketpair()
    reader, writer = await asyncio.open_unix_connection(sock=ours)
    peer_reader, peer_writer = await asyncio.open_unix_connection(sock=theirs)
    connection = Connection(writer)
    link = Link(connection, Channel(reader, writer))
    pump = asyncio.create_task(link.run())
    try:
        yield link, connection, (peer_reader, peer_writer)
    finally:
        pump.cancel()
        await asyncio.gather(pump, return_exceptions=True)
        writer.close()
        peer_writer.close()


async def serve_pings(peer: Peer) -> None:
    """The agent's side: its channel answers PING with PONG while it reads."""
    channel = Channel(*peer)
    while await channel.next_frames() is not None:
        pass


async def test_a_link_whose_peer_stopped_answering_is_closed() -> None:
    async with link_and_peer() as (link, connection, _silent_peer):
        link.open_stream()  # a request waits for its answer
        started = time.monotonic()
        await asyncio.wait_for(link.watch(AFTER, ANSWER_WITHIN), 5)
        took = time.monotonic() - started
    assert connection.closed and link.channel.closed
    assert took >= AFTER + ANSWER_WITHIN


async def test_a_quiet_link_that_answers_its_ping_stays_open() -> None:
    async with link_and_peer() as (link, connection, peer):
        answering = asyncio.create_task(serve_pings(peer))
        link.open_stream()  # a long answer is being computed: nothing arrives meanwhile
        watch = asyncio.create_task(link.watch(AFTER, ANSWER_WITHIN))
        await asyncio.sleep(4 * (AFTER + ANSWER_WITHIN))
        assert not watch.done() and not connection.closed
        watch.cancel()
        answering.cancel()
        await asyncio.gather(watch, answering, return_exceptions=True)


async def test_an_idle_link_is_not_probed() -> None:
    async with link_and_peer() as (link, connection, peer):
        watch = asyncio.create_task(link.watch(AFTER, ANSWER_WITHIN))
        await asyncio.sleep(3 * (AFTER + ANSWER_WITHIN))  # no stream open: SSH keepalive's job
        assert not watch.done() and not connection.closed
        link.channel.close()  # the link ends: the watch returns
        await asyncio.wait_for(watch, 5)
        sent = await asyncio.wait_for(peer[0].read(), 5)  # all the link sent, up to EOF
    assert all(frame.type != wire.PING for frame in wire.FrameDecoder().feed(sent))
