"""Leases on batches: one hub replica at a time sends a batch's input or copies its output.

A lease is two columns of the batch's row, `lease_owner` and `lease_until`, taken by a
conditional UPDATE (the row is free or its lease expired) and renewed by its holder every
third of `batches.lease_time` while the work runs. A replica that stops (killed, upgraded,
cut off) renews no more; once its lease expired another replica's poller takes it over and
does the work again from the start. A holder that cannot renew (another took over) has its
work cancelled (`LeaseLost`), so two replicas never write for the same batch for long.
The times are the replicas' wall clocks: they must agree to well within `lease_time`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import or_, update
from sqlalchemy.ext.asyncio import AsyncEngine

from hub.batches.tables import batches

log = logging.getLogger(__name__)
RELEASE_TIMEOUT = 2.0  # a stopping hub's last write for a lease it gives up


class LeaseLost(Exception):
    """Another replica holds the batch now; this one's work for it was cancelled."""


def replica_name() -> str:
    """This replica's name in leases: host, pid and a random part (a restarted process on
    the same host with the same pid is still another holder)."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(4)}"


class Leases:
    def __init__(self, engine: AsyncEngine, ttl: float, owner: str | None = None) -> None:
        self.engine, self.ttl = engine, ttl
        self.owner = owner or replica_name()

    async def take(self, batch_id: str, statuses: tuple[str, ...], now: float) -> bool:
        """Hold the batch if it is in one of `statuses` and nobody holds it (or the holder's
        lease expired)."""
        free = or_(batches.c.lease_owner.is_(None), batches.c.lease_until < now)
        statement = (
            update(batches)
            .where(batches.c.id == batch_id, batches.c.status.in_(statuses), free)
            .values(lease_owner=self.owner, lease_until=now + self.ttl)
        )
        async with self.engine.begin() as connection:
            return (await connection.execute(statement)).rowcount == 1

    async def renew(self, batch_id: str, now: float) -> bool:
        statement = (
            update(batches)
            .where(batches.c.id == batch_id, batches.c.lease_owner == self.owner)
            .values(lease_until=now + self.ttl)
        )
        async with self.engine.begin() as connection:
            return (await connection.execute(statement)).rowcount == 1

    async def release(self, batch_id: str) -> None:
        statement = (
            update(batches)
            .where(batches.c.id == batch_id, batches.c.lease_owner == self.owner)
            .values(lease_owner=None, lease_until=None)
        )
        async with self.engine.begin() as connection:
            await connection.execute(statement)

    @asynccontextmanager
    async def held(self, batch_id: str) -> AsyncIterator[None]:
        """Renew the (taken) lease while the body runs; LeaseLost when it could not be."""
        task = asyncio.current_task()
        assert task is not None
        lost: list[bool] = []
        renewer = asyncio.create_task(self._keep(batch_id, task, lost))
        try:
            yield
        except asyncio.CancelledError:
            if lost and task.uncancel() == 0:
                raise LeaseLost(f"batch {batch_id}: another replica holds it now") from None
            # This hub stops: another replica may take the batch over now, not at expiry.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(RELEASE_TIMEOUT):
                    await self.release(batch_id)
            raise
        finally:
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)

    async def _keep(self, batch_id: str, holder: asyncio.Task[object], lost: list[bool]) -> None:
        until = time.time() + self.ttl
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                if not await self.renew(batch_id, time.time()):
                    break
                until = time.time() + self.ttl
            except Exception as error:  # a database outage: try again, until it expired
                log.warning("batch %s: the lease was not renewed: %s", batch_id, error)
                if time.time() >= until:
                    break
        log.warning("batch %s: lease lost; stopping this replica's transfer", batch_id)
        lost.append(True)
        holder.cancel()
