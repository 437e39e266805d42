"""A request body passed on to the backend as it arrives (an audio upload), not held whole.

The session puts each DATA frame's bytes in; the backend request pulls them out
(`pieces()`, through `saia.base.http11.BodyStream`). Credit goes back to the hub only for
the bytes the backend request took (`taken`), so the mux's flow control bounds what waits
here to the stream's window, whatever the upload's size. A refusal while streaming (the
413 limit, the agent's budget) fails the pull with it; a body of which a piece was taken
(`started`) cannot be sent to another backend.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable

from saia.base import protocol as wire

# Bodies of these paths stream (multipart uploads of any size); other bodies are JSON,
# buffered whole (the fast path, and the router may rewrite them: `with_priority`).
STREAMED_PATHS = frozenset({"/v1/audio/transcriptions", "/v1/audio/translations"})


def streams_in(head: wire.RequestHead | None) -> bool:
    """Whether the request's body is passed on as it arrives (an upload). One set lookup:
    this runs for every request."""
    return head is not None and head.path in STREAMED_PATHS and head.method == "POST"


class Upload:
    """The pieces between the session (`put`, `end`, `fail`) and one backend request."""

    __slots__ = (
        *("_pieces", "_taken", "_waiter"),
        *("ended", "failure", "held", "peak", "received", "started"),
    )

    def __init__(self, taken: Callable[[int], None]) -> None:
        self._pieces: deque[bytes] = deque()
        self._taken = taken  # the session returns credit and budget for bytes taken
        self._waiter: asyncio.Future[None] | None = None
        self.held = 0  # bytes waiting here
        self.peak = 0  # the most bytes that waited here at once
        self.received = 0
        self.ended = False
        self.failure: BaseException | None = None
        self.started = False  # a piece was taken: it cannot be sent to another backend

    def put(self, data: bytes) -> None:
        self._pieces.append(data)
        self.received += len(data)
        self.held += len(data)
        self.peak = max(self.peak, self.held)
        self._wake()

    def end(self) -> None:
        self.ended = True
        self._wake()

    def fail(self, error: BaseException) -> int:
        """Keep nothing more; the pull raises `error`. Returns the bytes dropped."""
        self.failure = error
        dropped, self.held = self.held, 0
        self._pieces.clear()
        self._wake()
        return dropped

    async def pieces(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive; raises the failure, if any."""
        while True:
            while self._pieces and self.failure is None:
                piece = self._pieces.popleft()
                self.held -= len(piece)
                self.started = True
                self._taken(len(piece))
                yield piece
            if self.failure is not None:
                raise self.failure
            if self.ended:
                return
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
