"""The task that shares this replica's rate-limit counts with the others through the database.

Every `counter_sync_interval` it takes the book's unsynced counts plus a zero row for each
window of each subject in use (`WindowBook.take`), adds them to the database with one upsert
per batch of `BATCH_ROWS` rows (`CounterStore.bump`, atomic, returning the new totals) and
hands the totals back to the book. A failure is logged (once per run of failures), shown in
/health and retried with back-off; the counts wait in memory meanwhile, merged per window, so
they cost memory per subject, not per request. An outage error also marks the database down
(`hub.db_health`) like any other use. Cancelled, it gives its connection back (the store's
`async with`) and its counts to the book; asked to stop, it syncs once more, bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from hub.db_health import DatabaseHealth, describe, is_outage
from hub.usage.counters import CounterStore
from hub.usage.limits import window_starts
from hub.usage.records import retry_delay
from hub.usage.window_book import WindowBook

log = logging.getLogger(__name__)

BATCH_ROWS = 1000  # rows per statement: 5000 parameters, far below both databases' bound
LAST_SYNC = 5.0  # seconds the sync at shutdown may take


@dataclass(frozen=True)
class SyncStatus:
    running: bool
    unsynced: int  # requests counted here and not yet in the database (over all windows)
    failing: str | None  # the last error, while syncs fail
    failing_since: float | None  # epoch seconds of the first failure of this run


class CounterSync:
    def __init__(
        self,
        book: WindowBook,
        counters: CounterStore,
        interval: float,
        health: DatabaseHealth | None = None,
    ) -> None:
        self.book = book
        self._counters = counters
        self._interval = interval
        self._health = health if health is not None else DatabaseHealth()
        self._running = False
        self._failing: str | None = None
        self._failing_since: float | None = None
        self.syncs = 0  # successful syncs, ever

    def status(self) -> SyncStatus:
        return SyncStatus(self._running, self.book.unsynced, self._failing, self._failing_since)

    async def sync(self) -> bool:
        """One sync; False (logged, counts kept) if the database failed."""
        now = time.time()
        rows = self.book.take(window_starts(now), now)
        for first in range(0, len(rows), BATCH_ROWS):
            batch = rows[first : first + BATCH_ROWS]
            try:
                totals = await self._counters.bump(batch)
            except BaseException as error:
                self.book.requeue(rows[first:])
                if not isinstance(error, Exception):  # cancelled: the counts wait
                    raise
                self._failed(error)
                return False
            self.book.settled(batch, totals)
        self._succeeded()
        return True

    def _failed(self, error: Exception, what: str = "rate counter sync") -> None:
        if is_outage(error):
            self._health.failed(error, what)  # one warning per outage, there
            reason = self._health.reason
        else:
            reason = f"{what}: {describe(error)}"
        if self._failing is None:
            self._failing_since = time.time()
            if not is_outage(error):
                log.error("%s failed, retrying with back-off: %s", what, describe(error))
        self._failing = reason

    def _succeeded(self) -> None:
        self.syncs += 1
        if self._failing is not None:
            log.info("rate counters synced again (%.1f s after the first failure)",
                     time.time() - (self._failing_since or time.time()))  # fmt: skip
        self._failing = self._failing_since = None

    async def run(self, stop: asyncio.Event) -> None:
        """Sync every interval (backing off while failing) until `stop`, then once more."""
        self._running = True
        try:
            failures = 0
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(retry_delay(failures, self._interval)):
                        await stop.wait()
                try:
                    ok = await self.sync()
                except Exception as error:  # a bug: logged, retried, never the task's end
                    log.error("rate counter sync failed", exc_info=error)
                    self._failing = self._failing or f"rate counter sync: {describe(error)}"
                    ok = False
                failures = 0 if ok else failures + 1
            await self._last_sync()
        finally:
            self._running = False

    async def _last_sync(self) -> None:
        """What was counted since the last sync goes to the database before the hub ends
        (the other replicas go on counting), bounded: a database that is down loses them."""
        try:
            async with asyncio.timeout(LAST_SYNC):
                if await self.sync():
                    return
        except TimeoutError:
            pass
        if self.book.unsynced:
            log.error("exiting with %d rate-limit counts unsynced", self.book.unsynced)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[CounterSync]:
        """The task's lifetime: started on enter; on exit it syncs once more and ends."""
        stop = asyncio.Event()
        async with asyncio.TaskGroup() as group:
            group.create_task(self.run(stop), name="counter-sync")
            try:
                yield self
            finally:
                stop.set()
