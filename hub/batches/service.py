"""The hub's batches: their agents, the store of files, and the poller that follows them.

One `Batches` per hub, opened by the services with the app's lifespan. The poller asks
the agent of every running batch for its progress each `batches.poll_interval`, updates
`request_counts`, and once the job ended pulls the output (`hub/batches/finish.py`).
A batch is changed only by conditional updates (`WHERE status = ...`), so two hub
replicas polling the same batch do not finish it twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Protocol, runtime_checkable

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from hub.batches.file_store import FileStore, LocalFileStore
from hub.batches.finish import finish
from hub.batches.hop import AgentBatchError, AgentBatches
from hub.batches.start import start_batch
from hub.batches.tables import batches
from hub.config import HubConfig
from hub.upstreams.base import Upstream
from hub.upstreams.hop_client import HopClient
from hub.usage.accounting import UsageRecorder

log = logging.getLogger(__name__)

ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
HOP_TIMEOUT = 60.0  # first byte of an agent's answer about a batch
VALIDATING_STALE = 3600.0  # a batch left `validating` (its hub died meanwhile): failed


@runtime_checkable
class SiteUpstream(Protocol):
    """An upstream whose sites run batches (`hub.upstreams.hpc.HpcUpstream`)."""

    def site_client(self, index: int) -> HopClient: ...


class Batches:
    def __init__(
        self,
        config: HubConfig,
        engine: AsyncEngine,
        recorder: UsageRecorder,
        upstreams: dict[str, Upstream],
        store: FileStore | None = None,
    ) -> None:
        self.config, self.settings = config, config.batches
        self.engine, self.recorder, self.upstreams = engine, recorder, upstreams
        folder = self.settings.files_dir or config.data_dir / "files"
        self.store: FileStore = store or LocalFileStore(folder)
        self.wake = asyncio.Event()
        self._starting: set[asyncio.Task[None]] = set()  # owned here, cancelled at the end

    def launch(self, row: dict[str, Any], target: str, expires_at: float) -> None:
        """Send a new batch's input and submit its job, in the background."""
        task = asyncio.create_task(self._start(row, target, expires_at))
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)

    async def _start(self, row: dict[str, Any], target: str, expires_at: float) -> None:
        try:
            await start_batch(self, row, target, expires_at)
        except Exception:  # a database outage, a bug: the poller fails it when stale
            log.exception("batch %s: sending it to the agent failed", row["id"])

    def runs_batches(self, upstream: str) -> bool:
        return isinstance(self.upstreams.get(upstream), SiteUpstream)

    def agent(self, upstream: str, site: int) -> AgentBatches:
        chosen = self.upstreams[upstream]
        assert isinstance(chosen, SiteUpstream)
        return AgentBatches(chosen.site_client(site), HOP_TIMEOUT)

    async def file_in_use(self, file_id: str) -> bool:
        statement = select(batches.c.id).where(
            batches.c.input_file_id == file_id, batches.c.status.in_(ACTIVE)
        )
        async with self.engine.connect() as connection:
            return (await connection.execute(statement.limit(1))).first() is not None

    async def change(self, batch_id: str, expected: tuple[str, ...], **values: Any) -> bool:
        """Set `values` if the batch is still in one of the `expected` states."""
        statement = (
            update(batches)
            .where(batches.c.id == batch_id, batches.c.status.in_(expected))
            .values(**values)
        )
        async with self.engine.begin() as connection:
            return (await connection.execute(statement)).rowcount == 1

    async def row(self, batch_id: str) -> Any:
        async with self.engine.connect() as connection:
            statement = select(batches).where(batches.c.id == batch_id)
            return (await connection.execute(statement)).first()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Batches]:
        """The poller and the input transfers, all cancelled when the hub stops."""
        poller = asyncio.create_task(self._poll_forever())
        try:
            yield self
        finally:
            owned = [poller, *self._starting]
            for task in owned:
                task.cancel()
            await asyncio.gather(*owned, return_exceptions=True)

    async def _poll_forever(self) -> None:
        while True:
            try:
                await self.poll_once()
            except Exception:  # a database outage, a bug: log it, poll again later
                log.exception("polling batches failed")
            self.wake.clear()
            try:
                async with asyncio.timeout(self.settings.poll_interval):
                    await self.wake.wait()
            except TimeoutError:
                pass

    async def poll_once(self) -> None:
        statement = select(batches).where(batches.c.status.in_(ACTIVE))
        async with self.engine.connect() as connection:
            rows = (await connection.execute(statement)).all()
        for row in rows:
            try:
                await self.follow(row)
            except AgentBatchError as error:
                log.warning("batch %s: %s", row.id, error)
                if error.status == 404 and row.status != "validating":  # its files are gone
                    gone = {"state": "failed", "message": f"the agent lost the batch: {error}"}
                    await finish(self, row, gone, time.time())

    async def follow(self, row: Any) -> None:
        now = time.time()
        if row.status == "validating":
            if now - row.created_at > VALIDATING_STALE:
                await self.change(row.id, ("validating",), status="failed", failed_at=now,
                                  message="the hub stopped while sending the input")  # fmt: skip
            return
        agent = self.agent(row.upstream, row.site)
        if row.status == "in_progress" and row.expires_at and now > row.expires_at:
            await agent.cancel(row.id)
        state = await agent.status(row.id)
        done = int(state.get("completed", 0) or 0)
        if row.status == "cancelling" and state.get("state") in ("queued", "running"):
            state = await agent.cancel(row.id)  # again, or first: `saia hub batches cancel`
        if state.get("state") in ("queued", "running"):
            await self.change(row.id, ("in_progress", "cancelling"), completed=done,
                              job_id=state.get("job_id"), message=state.get("message"))  # fmt: skip
            return
        await finish(self, row, state, now)
