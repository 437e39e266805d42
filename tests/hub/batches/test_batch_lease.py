"""Leases on batch rows (hub/batches/lease.py) on the real database, SQLite and PostgreSQL:
one holder at a time, taken over only once expired, renewed while held, and a holder that
lost its lease has its work cancelled with LeaseLost."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from hub.batches.lease import LeaseLost, Leases
from hub.batches.service import Batches
from hub.batches.tables import batches
from hub.config import parse_config
from tests.hpc.helpers import until

BATCH = "batch-lease"


async def add_batch(engine: AsyncEngine, status: str = "validating") -> None:
    row = {
        "id": BATCH, "owner": "user:ann", "endpoint": "/v1/chat/completions", "model": "m",
        "upstream": "u", "site": 0, "input_file_id": "file-x", "completion_window": "24h",
        "status": status, "created_at": time.time(), "total": 1, "completed": 0, "failed": 0,
        "prompt_tokens": 0, "completion_tokens": 0, "price_factor": 1.0,
    }  # fmt: skip
    async with engine.begin() as connection:
        await connection.execute(insert(batches).values(**row))


async def holder(engine: AsyncEngine) -> str | None:
    async with engine.connect() as connection:
        query = select(batches.c.lease_owner).where(batches.c.id == BATCH)
        return (await connection.execute(query)).scalar_one()  # type: ignore[no-any-return]


async def test_one_holder_until_the_lease_expires(engine: AsyncEngine) -> None:
    await add_batch(engine)
    a, b = Leases(engine, 10.0, "a"), Leases(engine, 10.0, "b")
    now = time.time()
    assert not await a.take(BATCH, ("in_progress",), now)  # not in that state
    assert await a.take(BATCH, ("validating",), now)
    assert not await b.take(BATCH, ("validating",), now + 9)  # a holds it
    assert not await a.take(BATCH, ("validating",), now + 1)  # not twice, even by a
    assert await a.renew(BATCH, now + 5)  # now held until now + 15
    assert not await b.take(BATCH, ("validating",), now + 14)
    assert await b.take(BATCH, ("validating",), now + 16)  # expired: taken over
    assert not await a.renew(BATCH, now + 16) and await holder(engine) == "b"
    await a.release(BATCH)  # not a's to release
    assert await holder(engine) == "b"
    await b.release(BATCH)
    assert await holder(engine) is None


async def test_a_holder_that_lost_its_lease_is_cancelled(engine: AsyncEngine) -> None:
    await add_batch(engine, "finalizing")
    a, b = Leases(engine, 0.6, "a"), Leases(engine, 0.6, "b")
    assert await a.take(BATCH, ("finalizing",), time.time())
    renewals = 0
    with pytest.raises(LeaseLost):
        async with a.held(BATCH):
            # Renewed while held: b cannot take it for three lease times...
            for _ in range(3):
                await asyncio.sleep(0.6)
                renewals += not await b.take(BATCH, ("finalizing",), time.time())
            # ...until b takes it (as a replica would once a's lease expired).
            assert await b.take(BATCH, ("finalizing",), time.time() + 1.0)
            await until(lambda: False, 10, "a's work cancelled")
    assert renewals == 3 and await holder(engine) == "b"


async def test_a_holder_that_stops_gives_its_lease_up(engine: AsyncEngine) -> None:
    """A hub stopping (its tasks cancelled) releases what it held: another replica takes
    the batch over at its next poll, not once the lease expired."""
    await add_batch(engine, "finalizing")
    a = Leases(engine, 30.0, "a")
    assert await a.take(BATCH, ("finalizing",), time.time())
    started = asyncio.Event()

    async def work() -> None:
        async with a.held(BATCH):
            started.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(work())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await holder(engine) is None
    assert await Leases(engine, 30.0, "b").take(BATCH, ("finalizing",), time.time())


class RunningAgent:
    """The agent's answer for a batch whose job runs: what its files hold so far."""

    async def status(self, batch_id: str) -> dict[str, object]:
        return {"state": "running", "job_id": "77", "completed": 5, "failed": 2, "total": 9}


async def test_a_running_batch_shows_its_failed_requests_so_far(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    await add_batch(engine, "in_progress")
    config = parse_config({"data_dir": str(tmp_path)})
    service = Batches(config, engine, None, {})  # type: ignore[arg-type]  # no usage is written
    service.agent = lambda upstream, site: RunningAgent()  # type: ignore[assignment,method-assign,return-value]
    await service.follow(await service.row(BATCH))
    row = await service.row(BATCH)
    assert (row.status, row.completed, row.failed, row.job_id) == ("in_progress", 5, 2, "77")
