"""The hub's batches: their agents, the store of files, and the poller that follows them.

One `Batches` per hub, opened by the services with the app's lifespan. The poller asks
the agent of every running batch for its progress each `batches.poll_interval`, updates
`request_counts`, and once the job ended pulls the output (`hub/batches/finish.py`).
A batch is changed only by conditional updates (`WHERE status = ...`), and its input
transfer and output copy run under a lease (`hub/batches/lease.py`), so several hub replicas
polling the same batches send and copy each once; a batch left `validating` or `finalizing`
by a replica that stopped is taken over once its lease expired. Expired files are removed
here too (`hub/batches/expiry.py`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any, Protocol, runtime_checkable

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from hub.batches.expiry import ACTIVE, sweep_once
from hub.batches.file_store import FileStore, LocalFileStore
from hub.batches.finish import finish
from hub.batches.hop import AgentBatchError, AgentBatches
from hub.batches.lease import LeaseLost, Leases
from hub.batches.start import start_batch
from hub.batches.tables import batches
from hub.config import HubConfig
from hub.db_health import describe
from hub.upstreams.base import Upstream
from hub.upstreams.hop_client import HopClient
from hub.usage.accounting import UsageRecorder

log = logging.getLogger(__name__)

HOP_TIMEOUT = 60.0  # first byte of an agent's answer about a batch


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
        self.leases = Leases(engine, self.settings.lease_time)
        self.wake = asyncio.Event()
        self._starting: set[asyncio.Task[None]] = set()  # owned here, cancelled at the end
        self.failing: dict[str, str] = {}  # background work failing now -> why (/health)
        self.stale_swept = 0.0  # when the store was last searched for stale writes

    def launch(self, row: dict[str, Any], target: str, expires_at: float) -> None:
        """Send a new batch's input and submit its job, in the background."""
        task = asyncio.create_task(self._start(row, target, expires_at))
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)

    async def _start(self, row: dict[str, Any], target: str, expires_at: float) -> None:
        try:
            async with self.leases.held(row["id"]):
                await start_batch(self, row, target, expires_at)
        except LeaseLost as error:
            log.warning("%s", error)
        except Exception:  # a database outage, a bug: its lease expires, a poller sends again
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

    async def change(
        self, batch_id: str, expected: tuple[str, ...], held: bool = False, **values: Any
    ) -> bool:
        """Set `values` if the batch is still in one of the `expected` states (and, `held`,
        while this replica holds its lease)."""
        statement = update(batches).where(batches.c.id == batch_id, batches.c.status.in_(expected))
        if held:
            statement = statement.where(batches.c.lease_owner == self.leases.owner)
        statement = statement.values(**values)
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
            await self._noted("poller", self.poll_once())
            await self._noted("file expiry", sweep_once(self, time.time()))
            self.wake.clear()
            try:
                async with asyncio.timeout(self.settings.poll_interval):
                    await self.wake.wait()
            except TimeoutError:
                pass

    async def _noted(self, name: str, work: Awaitable[Any]) -> None:
        """Run one round of background work; a failure is logged and kept for /health
        until a round succeeds (a database outage, a bug: the next round tries again)."""
        try:
            await work
        except Exception as error:
            log.exception("batches: the %s failed", name)
            self.failing[name] = describe(error)  # no statement, no parameters
        else:
            self.failing.pop(name, None)

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
        if row.lease_until is not None and row.lease_until >= now:
            # A replica (maybe this one) sends its input or copies its output now.
            log.debug("batch %s: held by %s, skipped", row.id, row.lease_owner)
            return
        if row.status == "validating":
            await self.resend(row, now)
            return
        agent = self.agent(row.upstream, row.site)
        if row.status == "in_progress" and row.expires_at and now > row.expires_at:
            await agent.cancel(row.id)
        state = await agent.status(row.id)
        done = int(state.get("completed", 0) or 0)
        failed = int(state.get("failed", 0) or 0)  # answered with an error so far
        if row.status == "cancelling" and state.get("state") in ("queued", "running"):
            state = await agent.cancel(row.id)  # again, or first: `saia hub batches cancel`
        if state.get("state") in ("queued", "running"):
            await self.change(row.id, ("in_progress", "cancelling"), completed=done, failed=failed,
                              job_id=state.get("job_id"), message=state.get("message"))  # fmt: skip
            return
        await finish(self, row, state, now)

    async def resend(self, row: Any, now: float) -> None:
        """A batch left `validating` by a replica that stopped: its input sent again (the
        agent answers for a batch it has already, so it is never run twice)."""
        window = self.settings.completion_windows.get(row.completion_window, 86400.0)
        model = self.config.model(row.model)
        reason = None
        if now > row.created_at + window:
            reason = "the completion window passed before the input reached the agent"
        elif model is None:
            reason = f"model {row.model} is no longer configured"
        if reason is not None:
            await self.change(row.id, ("validating",), status="failed", failed_at=now,
                              message=reason)  # fmt: skip
            return
        if await self.leases.take(row.id, ("validating",), now):
            log.info("batch %s: sending its input again (its replica stopped)", row.id)
            assert model is not None
            self.launch(dict(row._mapping), model.target, row.created_at + window)
