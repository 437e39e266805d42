"""Usage accounting off the request path: records queue in memory, one task writes batches.

A request appends its record (never prompt or answer text) without awaiting; the writer,
owned by the app's lifespan, writes everything queued at least every `interval` seconds in
one transaction and adds the tokens to the rate-limit counters in the same one.

The writer survives anything but cancellation. While the database is unavailable the
records stay queued (bounded: past `MAX_PENDING` the oldest are dropped, counted and logged)
and the writer retries with back-off; it also probes an idle database, so that an outage
is noticed, and its end too (`hub.db_health`). Rows are keyed by request id: a batch whose
commit was lost and is written again neither duplicates a row nor counts tokens twice. On
shutdown it flushes once more, retrying (bounded) through a short outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import case, delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from hub.db_health import DATABASE_ERRORS, DatabaseHealth, describe, is_outage
from hub.storage import rate_counters, usage
from hub.usage.counters import CounterStore, Row, merge_rows
from hub.usage.limits import TOKEN_WINDOWS, window_bounds
from hub.usage.records import UsageRecord, retry_delay, sanitized

log = logging.getLogger(__name__)

MAX_PENDING = 200_000
MAX_BATCH = 5_000  # records per transaction
PRUNE_INTERVAL = 3600.0
PRUNE_RETRY = 60.0
COUNTER_RETENTION = 40 * 86400.0  # longer than any window (a month)
WRITE_TIMEOUT = 30.0  # one batch; a locked SQLite gives up first (busy timeout 10 s)
PROBE_EVERY = 5.0  # seconds without a successful write before an idle writer probes
SHUTDOWN_RETRY = 10.0  # seconds the last flush retries through an outage
SETTLE = 0.2  # seconds the last flush waits for records of requests cut at shutdown
GroupBy = Literal["user", "key", "model", "group", "upstream"]
_COLUMNS = {
    "user": usage.c.user_name,
    "key": usage.c.key_id,
    "model": usage.c.model,
    "group": usage.c.group_name,
    "upstream": usage.c.upstream,
}
# A write that changes nothing: unlike a read, a locked SQLite refuses it too.
_PROBE = delete(rate_counters).where(
    rate_counters.c.subject == "", rate_counters.c.period == "", rate_counters.c.start == 0
)
Queued = tuple[UsageRecord, tuple[str, ...]]

__all__ = ["UsageRecord", "UsageRecorder", "WriterStatus", "parse_moment", "usage_summary"]


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


def _insert_statement(dialect: str) -> Any:
    """INSERT of usage rows that skips request ids already stored, returning the new ones."""
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert(usage).on_conflict_do_nothing(index_elements=["request_id"])
    return statement.returning(usage.c.request_id)


def _new_tokens(
    batch: Iterable[Queued], inserted: set[str]
) -> list[tuple[str, str, int, int, int]]:
    """Token counter rows of the records actually inserted (once per request id)."""
    rows = []
    for record, subjects in batch:
        if record.request_id in inserted:
            inserted.discard(record.request_id)
            rows.extend(token_rows(record, subjects))
    return merge_rows(rows)


@dataclass(frozen=True)
class WriterStatus:
    running: bool
    pending: int
    oldest_age: float  # seconds the oldest queued record has waited
    dropped: int  # records lost to the queue bound, ever
    rejected: int  # records the database refused one by one, ever
    failing: str | None  # the last error, while writes fail


class UsageRecorder:
    def __init__(
        self,
        engine: AsyncEngine,
        counters: CounterStore,
        interval: float,
        health: DatabaseHealth | None = None,
    ) -> None:
        self._engine = engine
        self._counters = counters
        self._interval = interval
        self.health = health if health is not None else DatabaseHealth()
        self._pending: deque[Queued] = deque()
        self._batch: list[Queued] = []  # being written
        self._lock = asyncio.Lock()
        self._insert = _insert_statement(engine.dialect.name)
        self._dropped = 0
        self._overflow = 0  # dropped since the last successful write
        self._rejected = 0
        self._failing: str | None = None
        self._running = False
        self._closed = False  # the writer has ended: a record now cannot be written
        self._last_ok = time.monotonic()
        # Told the token rows of each committed batch (the in-memory windows, when on).
        self.tokens_written: Callable[[list[Row]], None] = lambda _rows: None

    def record(self, record: UsageRecord, token_subjects: tuple[str, ...] = ()) -> None:
        """Queue one record; never blocks. `token_subjects` get its tokens counted."""
        if self._closed:
            log.error("usage of %s arrived after the usage writer ended: not written", record)
            return
        if len(self._pending) >= MAX_PENDING:
            self._drop(1)
        self._pending.append((sanitized(record), token_subjects))

    def _drop(self, count: int) -> None:
        """Drop the `count` oldest records: counted, and logged once per overflow."""
        for _ in range(count):
            self._pending.popleft()
        if not self._overflow:
            log.error(
                "usage queue full (%d records, database not taking them): dropping the oldest",
                MAX_PENDING,
            )
        self._overflow += count
        self._dropped += count

    @property
    def pending(self) -> int:
        """Records not yet written (including a batch being written)."""
        return len(self._pending) + len(self._batch)

    def status(self) -> WriterStatus:
        oldest = self._batch[0] if self._batch else self._pending[0] if self._pending else None
        age = max(0.0, time.time() - oldest[0].finished_at) if oldest else 0.0
        return WriterStatus(
            self._running, self.pending, age, self._dropped, self._rejected, self._failing
        )

    async def flush(self) -> int:
        """Write everything queued (after any write in progress); the number written. On
        failure the records stay queued and the error goes to the log and /health."""
        written, _ok = await self._flush()
        return written

    async def _flush(self) -> tuple[int, bool]:
        """Write the queue in batches of at most MAX_BATCH (a backlog after an outage must
        not become one transaction too large for its timeout); stop at the first failure."""
        written = 0
        async with self._lock:
            while self._pending:
                size = min(len(self._pending), MAX_BATCH)
                self._batch = [self._pending.popleft() for _ in range(size)]
                try:
                    done, ok = await self._write(self._batch)
                except BaseException:  # cancelled: the records wait for the next flush
                    self._requeue(self._batch)
                    raise
                finally:
                    self._batch = []
                written += done
                if not ok:
                    return written, False
        return written, True

    def _requeue(self, records: list[Queued]) -> None:
        """Put unwritten records back in front of those queued meanwhile (bounded)."""
        self._pending.extendleft(reversed(records))
        if len(self._pending) > MAX_PENDING:
            self._drop(len(self._pending) - MAX_PENDING)

    async def _write(self, batch: list[Queued]) -> tuple[int, bool]:
        try:
            await self._insert_all(batch)
        except Exception as error:
            if isinstance(error, DATABASE_ERRORS) and not is_outage(error):
                return await self._write_each(batch)
            self._failed(error, "usage writer")
            self._requeue(batch)
            return 0, False
        self._succeeded()
        return len(batch), True

    async def _insert_all(self, batch: list[Queued]) -> None:
        """One transaction: the new rows, and the tokens of exactly those rows."""
        async with asyncio.timeout(WRITE_TIMEOUT), self._engine.begin() as connection:
            # vars(): a shallow copy is enough (asdict deep-copies every value).
            result = await connection.execute(self._insert, [dict(vars(r)) for r, _ in batch])
            inserted = set(result.scalars())
            tokens = _new_tokens(batch, inserted)
            await self._counters.bump_in(connection, tokens)
        self.tokens_written(tokens)

    async def _write_each(self, batch: list[Queued]) -> tuple[int, bool]:
        """A batch the database refused for its values: each record alone, so that one bad
        record costs only itself (dropped, counted and logged), never the others."""
        written = 0
        for index, item in enumerate(batch):
            try:
                await self._insert_all([item])
            except Exception as error:
                if isinstance(error, DATABASE_ERRORS) and not is_outage(error):
                    self._rejected += 1
                    log.error(
                        "usage record %s refused by the database, dropped (%d so far): %s",
                        item[0].request_id, self._rejected, describe(error),
                    )  # fmt: skip
                    continue
                self._failed(error, "usage writer")
                self._requeue(batch[index:])
                return written, False
            written += 1
        self._succeeded()
        return written, True

    def _failed(self, error: Exception, what: str) -> None:
        """Log a failed write: an outage once per outage (db_health), anything else once
        per run of failures; the writer keeps going either way."""
        first = self._failing is None
        if is_outage(error):
            self.health.failed(error, what)
            self._failing = self.health.reason
            return
        self._failing = f"{what}: {describe(error)}"
        if first and isinstance(error, DATABASE_ERRORS):
            log.error("%s failed, retrying with back-off: %s", what, describe(error))
        elif first:
            log.error("%s failed, retrying with back-off", what, exc_info=error)

    def _succeeded(self) -> None:
        if self._overflow:
            log.error("usage queue overflowed: %d records were dropped", self._overflow)
            self._overflow = 0
        if self._failing is not None:
            log.info("usage writer writing again (%d records queued)", self.pending)
        self._failing = None
        self._last_ok = time.monotonic()
        self.health.recovered()

    async def probe(self) -> bool:
        """Whether the database takes a write now (noting an outage or its end)."""
        try:
            async with asyncio.timeout(WRITE_TIMEOUT), self._engine.begin() as connection:
                await connection.execute(_PROBE)
        except Exception as error:
            self._failed(error, "database probe")
            return False
        self._succeeded()
        return True

    async def _step(self) -> bool:
        """Flush what is queued; with nothing queued, probe when the database is down or
        has not been written to for a while. False if the database failed."""
        if self._pending:
            return (await self._flush())[1]
        if self.health.down or time.monotonic() - self._last_ok >= PROBE_EVERY:
            return await self.probe()
        return True

    async def run(self, stop: asyncio.Event) -> None:
        """Write every interval (backing off while failing) until `stop` is set, then flush
        what is left; prune old counters hourly."""
        self._running = True
        try:
            await self._loop(stop)
            await self._last_flush()
        finally:
            self._running = False

    async def _loop(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        next_prune = loop.time()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(retry_delay(failures, self._interval)):
                    await stop.wait()
            try:
                ok = await self._step()
            except Exception as error:  # a bug: logged, retried, never the writer's end
                self._failed(error, "usage writer")
                ok = False
            failures = 0 if ok else failures + 1
            if not failures and loop.time() >= next_prune:
                ok = await self._prune()
                next_prune = loop.time() + (PRUNE_INTERVAL if ok else PRUNE_RETRY)

    async def _last_flush(self) -> None:
        """The flush at shutdown, retried for a few seconds through an outage; what still
        cannot be written is logged with its count (nothing is lost silently)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SHUTDOWN_RETRY
        failures = 0
        while loop.time() < deadline:
            if (await self._flush())[1]:
                # Requests the server cut at shutdown record their usage as they unwind,
                # possibly just after this flush: a moment for them, then flush again.
                await asyncio.sleep(SETTLE)
                if not self._pending:
                    break
                continue
            failures += 1
            left = deadline - loop.time()
            await asyncio.sleep(max(0.0, min(retry_delay(failures, self._interval), left)))
        self._closed = True
        if self._pending:
            log.error("exiting with %d usage records unwritten: %s", self.pending, self._failing)

    async def _prune(self) -> bool:
        try:
            await self._counters.prune(time.time() - COUNTER_RETENTION)
        except Exception as error:
            self._failed(error, "pruning old rate-limit counters")
            return False
        return True

    @asynccontextmanager
    async def running(self) -> AsyncIterator[UsageRecorder]:
        """The writer's lifetime: started on enter; on exit it drains the queue and ends."""
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
