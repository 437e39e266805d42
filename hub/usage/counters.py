"""Fixed-window rate counters in the database, shared by all hub replicas.

Counts are added to every window of every limited subject with ONE statement,
`INSERT ... ON CONFLICT DO UPDATE ... RETURNING` (valid on SQLite 3.35+ and PostgreSQL),
which is atomic, so several hub replicas on one PostgreSQL share their counts exactly: per
request (`counter_sync_interval: 0`), or per batch from the sync task (`hub/usage/window_sync.py`).
This call goes to the database driver directly (asyncpg's pool, or one aiosqlite
connection: SQLite has one writer at a time anyway) without SQLAlchemy's per-statement
work; the batched token updates join the usage writer's SQLAlchemy transaction instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiosqlite
import asyncpg
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection

Row = tuple[str, str, int, int, int]  # subject, period, start, requests, tokens
Style = Literal["qmark", "numeric", "named"]
TIMEOUT = 6.0  # seconds for one counter statement (a request waits for it)
SQLITE_BUSY = 5.0  # seconds a request's counter update waits for another SQLite writer


@dataclass(frozen=True)
class CounterRow:
    subject: str
    period: str
    start: int
    requests: int
    tokens: int


def bump_sql(rows: int, style: Style) -> str:
    """The upsert of `rows` rows in a driver's parameter style."""

    def mark(index: int) -> str:
        if style == "qmark":
            return "?"
        if style == "numeric":
            return f"${index + 1}"
        return f":p{index}"

    values = ", ".join(
        "(" + ", ".join(mark(row * 5 + column) for column in range(5)) + ")" for row in range(rows)
    )
    return (
        "INSERT INTO rate_counters (subject, period, start, requests, tokens) "
        f"VALUES {values} ON CONFLICT (subject, period, start) DO UPDATE SET "
        "requests = rate_counters.requests + excluded.requests, "
        "tokens = rate_counters.tokens + excluded.tokens "
        "RETURNING subject, period, start, requests, tokens"
    )


def _flat(rows: Sequence[Row]) -> list[Any]:
    return [value for row in rows for value in row]


class CounterStore:
    """Open with `await CounterStore.open(url)`, close with `aclose()`."""

    def __init__(self, backend: _Sqlite | _Postgres) -> None:
        self._backend = backend
        self._sql: dict[int, str] = {}
        self._named: dict[int, Any] = {}

    @classmethod
    async def open(cls, url: str) -> CounterStore:
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite":
            if not parsed.database or parsed.database == ":memory:":
                raise ValueError("rate counters need a SQLite file, not :memory:")
            return cls(await _Sqlite.open(Path(parsed.database)))
        dsn = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
        return cls(await _Postgres.open(dsn))

    async def aclose(self) -> None:
        await self._backend.aclose()

    @property
    def in_use(self) -> int:
        """Connections (or, on SQLite, the one connection) busy with a statement now."""
        return self._backend.in_use

    async def bump(self, rows: Sequence[Row]) -> list[CounterRow]:
        """Add (requests, tokens) to each row; the new totals. Rows must be unique per
        (subject, period, start): one statement cannot touch a row twice on PostgreSQL."""
        if not rows:
            return []
        sql = self._sql.get(len(rows))
        if sql is None:
            sql = self._sql[len(rows)] = bump_sql(len(rows), self._backend.style)
        async with asyncio.timeout(TIMEOUT):
            found = await self._backend.fetch(sql, _flat(rows))
        return [CounterRow(*row) for row in found]

    async def bump_in(self, connection: AsyncConnection, rows: Sequence[Row]) -> None:
        """The same upsert inside the caller's SQLAlchemy transaction (the usage writer)."""
        if not rows:
            return
        statement = self._named.get(len(rows))
        if statement is None:
            statement = self._named[len(rows)] = text(bump_sql(len(rows), "named"))
        params = {f"p{index}": value for index, value in enumerate(_flat(rows))}
        await connection.execute(statement, params)

    async def prune(self, before: float) -> None:
        """Drop windows that started before `before` (epoch seconds)."""
        mark = "?" if self._backend.style == "qmark" else "$1"
        async with asyncio.timeout(TIMEOUT * 6):
            await self._backend.fetch(f"DELETE FROM rate_counters WHERE start < {mark}", [
                int(before)
            ])  # fmt: skip


class _Sqlite:
    style: Style = "qmark"

    def __init__(self, connection: aiosqlite.Connection) -> None:
        self._connection = connection
        self._lock = asyncio.Lock()  # one statement at a time on the one connection

    @property
    def in_use(self) -> int:
        return 1 if self._lock.locked() else 0

    @classmethod
    async def open(cls, path: Path) -> _Sqlite:
        path.parent.mkdir(parents=True, exist_ok=True)
        connection = await aiosqlite.connect(
            path,
            timeout=SQLITE_BUSY,
            isolation_level=None,
            cached_statements=16,  # one statement per batch size: see hub/storage.py
        )
        await connection.execute("PRAGMA journal_mode=WAL")
        await connection.execute("PRAGMA synchronous=NORMAL")
        return cls(connection)

    async def fetch(self, sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
        async with self._lock:
            return [tuple(row) for row in await self._connection.execute_fetchall(sql, params)]

    async def aclose(self) -> None:
        await self._connection.close()


class _Postgres:
    style: Style = "numeric"

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @property
    def in_use(self) -> int:
        return int(self._pool.get_size() - self._pool.get_idle_size())

    @classmethod
    async def open(cls, dsn: str) -> _Postgres:
        # No floor of idle connections: asyncpg would restore it in the background, logging
        # a traceback per attempt during an outage. Connections are made on demand.
        pool = await asyncpg.create_pool(dsn, min_size=0, max_size=20, timeout=TIMEOUT)
        return cls(pool)

    async def fetch(self, sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in await self._pool.fetch(sql, *params)]

    async def aclose(self) -> None:
        await self._pool.close()


def merge_rows(
    rows: Iterable[Row],
) -> list[Row]:
    """Sum rows with the same (subject, period, start) so one statement touches each once."""
    merged: dict[tuple[str, str, int], list[int]] = {}
    for subject, period, start, requests, tokens in rows:
        total = merged.setdefault((subject, period, start), [0, 0])
        total[0] += requests
        total[1] += tokens
    return [(s, p, t, r, k) for (s, p, t), (r, k) in merged.items()]
