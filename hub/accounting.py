"""Usage accounting off the request path: records queue in memory, one task writes batches.

A request appends its record (never prompt or answer text) without awaiting; the flusher,
owned by the app's lifespan, writes everything queued at least every `interval` seconds in
one transaction, adds the tokens to the rate-limit counters, and flushes once more on
shutdown. A crash loses at most the last interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import case, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from hub.counters import CounterStore, merge_rows
from hub.limits import TOKEN_WINDOWS, window_bounds
from hub.storage import usage

log = logging.getLogger(__name__)

MAX_PENDING = 200_000
PRUNE_INTERVAL = 3600.0
COUNTER_RETENTION = 40 * 86400.0  # longer than any window (a month)
GroupBy = Literal["user", "key", "model", "group", "upstream"]
_COLUMNS = {
    "user": usage.c.user_name,
    "key": usage.c.key_id,
    "model": usage.c.model,
    "group": usage.c.group_name,
    "upstream": usage.c.upstream,
}


@dataclass(frozen=True)
class UsageRecord:
    request_id: str
    key_id: str | None
    user_name: str | None
    group_name: str | None
    model: str
    upstream: str
    endpoint: str
    status: int
    stream: bool
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    ttft_ms: float | None
    started_at: float
    finished_at: float


def token_rows(
    record: UsageRecord, subjects: tuple[str, ...]
) -> list[tuple[str, str, int, int, int]]:
    tokens = record.prompt_tokens + record.completion_tokens
    if not tokens:
        return []
    return [
        (subject, window, window_bounds(window, record.started_at)[0], 0, tokens)
        for subject in subjects
        for window in TOKEN_WINDOWS
    ]


class UsageRecorder:
    def __init__(self, engine: AsyncEngine, counters: CounterStore, interval: float) -> None:
        self._engine = engine
        self._counters = counters
        self._interval = interval
        self._pending: list[tuple[UsageRecord, tuple[str, ...]]] = []
        self._writing = 0
        self._lock = asyncio.Lock()

    def record(self, record: UsageRecord, token_subjects: tuple[str, ...] = ()) -> None:
        """Queue one record; never blocks. `token_subjects` get its tokens counted."""
        if len(self._pending) >= MAX_PENDING:
            log.warning("usage queue full (%d): dropping the oldest record", MAX_PENDING)
            del self._pending[0]
        self._pending.append((record, token_subjects))

    @property
    def pending(self) -> int:
        """Records not yet written (including a batch being written)."""
        return len(self._pending) + self._writing

    async def flush(self) -> int:
        """Write everything queued (after any write in progress); keep it on failure."""
        async with self._lock:
            return await self._write()

    async def _write(self) -> int:
        batch, self._pending = self._pending, []
        if not batch:
            return 0
        rows = merge_rows(row for record, subjects in batch for row in token_rows(record, subjects))
        self._writing = len(batch)
        try:
            async with self._engine.begin() as connection:
                # vars(): a shallow copy is enough (asdict deep-copies every value).
                await connection.execute(usage.insert(), [dict(vars(r)) for r, _ in batch])
                # Same transaction: a batch is counted exactly once, or retried whole.
                await self._counters.bump_in(connection, rows)
        except (SQLAlchemyError, OSError) as error:
            log.error("writing %d usage records failed: %s", len(batch), error)
            self._pending[:0] = batch
            return 0
        except BaseException:
            self._pending[:0] = batch
            raise
        finally:
            self._writing = 0
        return len(batch)

    async def run(self, stop: asyncio.Event) -> None:
        """Flush every interval until `stop` is set, then once more; prune old counters."""
        loop = asyncio.get_running_loop()
        next_prune = loop.time()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await stop.wait()
            await self.flush()
            if loop.time() >= next_prune:
                next_prune = loop.time() + PRUNE_INTERVAL
                await self._prune()
        await self.flush()

    async def _prune(self) -> None:
        try:
            await self._counters.prune(time.time() - COUNTER_RETENTION)
        except (SQLAlchemyError, OSError) as error:
            log.warning("pruning old rate-limit counters failed: %s", error)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[UsageRecorder]:
        """The flusher's lifetime: started on enter; on exit it drains the queue and ends."""
        stop = asyncio.Event()
        async with asyncio.TaskGroup() as group:
            group.create_task(self.run(stop), name="usage-flusher")
            try:
                yield self
            finally:
                stop.set()


async def usage_summary(
    engine: AsyncEngine, *, since: float, until: float | None, by: GroupBy
) -> list[dict[str, Any]]:
    """Requests, tokens and mean latency per user, key, model, group or upstream."""
    column = _COLUMNS[by]
    statement = (
        select(
            column.label(by),
            func.count().label("requests"),
            func.coalesce(func.sum(usage.c.prompt_tokens), 0).label("prompt_tokens"),
            func.coalesce(func.sum(usage.c.completion_tokens), 0).label("completion_tokens"),
            func.sum(case((usage.c.status >= 400, 1), else_=0)).label("errors"),
            func.avg(usage.c.latency_ms).label("mean_latency_ms"),
        )
        .where(usage.c.started_at >= since)
        .group_by(column)
        .order_by(column)
    )
    if until is not None:
        statement = statement.where(usage.c.started_at < until)
    async with engine.connect() as connection:
        result = await connection.execute(statement)
        return [
            {**row._asdict(), "mean_latency_ms": round(float(row.mean_latency_ms or 0), 1)}
            for row in result.all()
        ]


def parse_moment(text: str) -> float:
    """Epoch seconds of `2026-11-01` (midnight UTC) or an ISO date-time (UTC if naive)."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a date such as 2026-11-01") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
