"""Leader election between agents sharing a state dir: whoever holds the flock acts.

The lock is an OS file lock (`filelock`), so it is released when the holder dies, however
it dies. A standby agent polls it without blocking the event loop (`timeout=0`, then an
asyncio sleep) and takes over within one poll interval.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from types import TracebackType

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)
LOCK_FILE = "agent.lock"


class LeaderLock:
    """`async with LeaderLock(path):` waits (as standby) until this process leads."""

    def __init__(self, path: Path, poll_interval: float = 1.0) -> None:
        self.path = path
        self.poll_interval = poll_interval
        self._lock = FileLock(path, thread_local=False)

    @property
    def held(self) -> bool:
        return self._lock.is_locked

    def try_acquire(self) -> bool:
        """Take the lock if free; never waits."""
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            return False
        return True

    async def acquire(self) -> None:
        if self.try_acquire():
            return
        log.info("standby: another agent holds %s", self.path)
        # flock offers no notification to await: polling with timeout=0 is the only way
        # that never blocks the event loop.
        while not self.try_acquire():  # noqa: ASYNC110
            await asyncio.sleep(self.poll_interval)
        log.info("taking over: acquired %s", self.path)

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release(force=True)

    async def __aenter__(self) -> LeaderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        await self.acquire()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
