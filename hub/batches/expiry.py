"""Expired files removed from the store and the table (`expires_after`, `batches.file_lifetime`).

Run by every replica's poller after each poll. Deleting is idempotent, so replicas that
sweep at the same time need no lease: the contents go first, then the row (a replica that
stops in between leaves an expired row, which reads as gone and the next sweep removes).
The input file of a batch still running is kept until the batch ended. What a killed
writer left in the store (`.<id>.part`), and a stored file no row names (a replica
stopped between committing it and recording it), go once they are STALE_PART old, looked
for at most once per STALE_EVERY.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncEngine

from hub.batches.file_store import FileStore
from hub.batches.tables import batches, files

log = logging.getLogger(__name__)

ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
SWEEP_LIMIT = 500  # files removed per round at most (the next round takes the rest)
STALE_PART = 86400.0  # no writer runs this long (an upload or a copy under its lease)
STALE_EVERY = 3600.0  # a whole listing of the store: not every round


class Sweeper(Protocol):
    engine: AsyncEngine
    store: FileStore
    stale_swept: float  # when the store was last searched for stale writes


async def sweep_once(keeper: Sweeper, now: float) -> int:
    """Remove up to SWEEP_LIMIT files that expired by `now`; how many were removed."""
    in_use = select(batches.c.input_file_id).where(batches.c.status.in_(ACTIVE))
    due = (
        select(files.c.id)
        .where(files.c.expires_at < now, files.c.id.not_in(in_use))
        .limit(SWEEP_LIMIT)
    )
    async with keeper.engine.connect() as connection:
        found: list[Any] = list((await connection.execute(due)).scalars())
    for file_id in found:
        await keeper.store.delete(file_id)
        async with keeper.engine.begin() as connection:
            await connection.execute(
                delete(files).where(files.c.id == file_id, files.c.expires_at < now)
            )
    if found:
        log.info("removed %d expired file(s)", len(found))
    if now - keeper.stale_swept >= STALE_EVERY:
        keeper.stale_swept = now
        if stale := await keeper.store.remove_stale(now - STALE_PART):
            log.warning("removed %d write(s) left unfinished in the file store", stale)
        if orphans := await _remove_orphans(keeper, now - STALE_PART):
            log.warning("removed %d stored file(s) that no file row names", orphans)
    return len(found)


async def _remove_orphans(keeper: Sweeper, before: float) -> int:
    """Remove stored files older than `before` that no row names: a replica stopped after
    committing a batch's output to the store and before recording it (the row and the
    batch's status are written in one transaction after the store commit)."""
    stored = await keeper.store.committed_before(before)
    named: set[str] = set()
    for start in range(0, len(stored), SWEEP_LIMIT):
        chunk = stored[start : start + SWEEP_LIMIT]
        async with keeper.engine.connect() as connection:
            query = select(files.c.id).where(files.c.id.in_(chunk))
            named.update((await connection.execute(query)).scalars())
    orphans = [file_id for file_id in stored if file_id not in named]
    for file_id in orphans:
        await keeper.store.delete(file_id)
    return len(orphans)
