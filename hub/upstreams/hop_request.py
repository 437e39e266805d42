"""One request stream's two halves on the hub's side of the hop: its body sent as the
agent's credit allows (stopping when the agent answers first), and its response read as
it streams (`HopResponse`). Used by `hub/upstreams/hop_client.py`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator

from hub.upstreams.hop_link import HopError, Link
from saia.base import protocol as wire
from saia.base.mux import Channel, Lost, StreamState


class HopResponse:
    """A response whose body streams from the login node (like httpx's stream mode)."""

    def __init__(
        self, status: int, headers: list[tuple[str, str]], link: Link, state: StreamState
    ) -> None:
        self.status = status
        self.headers = headers
        self._link = link
        self._state = state
        self.finished = False

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        channel, state = self._link.channel, self._state
        while not self.finished:
            item = await state.inbox.get()
            if isinstance(item, Lost):
                self.finished = True
                raise HopError("the connection to the login node broke during the response")
            if item.type == wire.DATA:
                channel.consumed(state, len(item.payload))
                yield item.payload
            elif item.type == wire.END:
                self.finished = True
            else:
                self.finished = True
                error = wire.parse_error(item.payload)
                raise HopError(error.message, error.status)


async def send_unless_answered(
    channel: Channel,
    state: StreamState,
    body: bytes | AsyncIterable[bytes],
    budget: asyncio.Timeout,
) -> bool:
    """Send a body that may wait for credit, unless the agent answers first: it refuses an
    upload at its head (413, 503) or its backend answers early, and then sends no more
    credit. True if it answered before the body was all sent (no END then: the agent keeps
    nothing of a stream it answered)."""
    if isinstance(body, bytes):
        sending = asyncio.ensure_future(channel.send_data(state, body))
    else:
        sending = asyncio.ensure_future(_send_pieces(channel, state, body, budget))
    answered = asyncio.ensure_future(state.inbox.wait())
    try:
        await asyncio.wait((sending, answered), return_when=asyncio.FIRST_COMPLETED)
    finally:
        answered.cancel()
        if not sending.done():
            sending.cancel()
        await asyncio.gather(sending, answered, return_exceptions=True)
    if sending.cancelled():
        return True
    sending.result()  # StreamClosed, or the client's upload failing
    return False


async def _send_pieces(
    channel: Channel, state: StreamState, body: AsyncIterable[bytes], budget: asyncio.Timeout
) -> None:
    """A body that streams in: the hub holds one piece at a time (the mux's flow control
    paces it to the agent). The client's pace is bounded by the hub server's body timeouts,
    so the first-byte timeout is held while sending and starts anew after the last piece."""
    loop = asyncio.get_running_loop()
    deadline = budget.when()
    limit = None if deadline is None else deadline - loop.time()
    budget.reschedule(None)
    async for piece in body:
        if piece:
            await channel.send_data(state, piece)
    budget.reschedule(None if limit is None else loop.time() + limit)
