"""Test-side helpers for `saia.base.mux` channels (not needed by the hub or the agent)."""

from __future__ import annotations

from collections import deque
from weakref import WeakKeyDictionary

from saia.base import protocol as wire
from saia.base.mux import Channel

_LEFT: WeakKeyDictionary[Channel, deque[wire.Frame]] = WeakKeyDictionary()


async def next_frame(channel: Channel) -> wire.Frame | None:
    """The channel's next frame for its owner, one at a time (None at EOF)."""
    left = _LEFT.setdefault(channel, deque())
    if not left:
        frames = await channel.next_frames()
        if frames is None:
            return None
        left.extend(frames)
    return left.popleft()
