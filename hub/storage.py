"""The hub's database: keys, rate-limit counters and usage, via SQLAlchemy 2 async.

SQLite (aiosqlite) by default, PostgreSQL (asyncpg) by URL; the schema is created and
upgraded by alembic (`hub/migrations`). Rate counters are fixed windows incremented with one
`INSERT ... ON CONFLICT DO UPDATE ... RETURNING` in autocommit mode, so the hot path costs
one round trip and several replicas on one PostgreSQL share the counts atomically.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Connection,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    event,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

log = logging.getLogger(__name__)

metadata = MetaData()

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(16), primary_key=True),
    Column("digest", String(64), nullable=False),
    Column("name", String(200), nullable=False),
    Column("owner", String(200), nullable=True),
    Column("group_name", String(200), nullable=True),
    Column("admin", Boolean, nullable=False),
    Column("allowed_models", JSON, nullable=True),
    Column("limits", JSON, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=True),
    Column("revoked_at", Float, nullable=True),
)

rate_counters = Table(
    "rate_counters",
    metadata,
    Column("subject", String(256), primary_key=True),
    Column("period", String(8), primary_key=True),
    Column("start", BigInteger, primary_key=True),
    Column("requests", BigInteger, nullable=False),
    Column("tokens", BigInteger, nullable=False),
)

usage = Table(
    "usage",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    Column("request_id", String(64), nullable=False),
    Column("key_id", String(16), nullable=True),
    Column("user_name", String(200), nullable=True),
    Column("group_name", String(200), nullable=True),
    Column("model", String(200), nullable=False),
    Column("upstream", String(100), nullable=False),
    Column("endpoint", String(40), nullable=False),
    Column("status", Integer, nullable=False),
    Column("stream", Boolean, nullable=False),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("latency_ms", Float, nullable=False),
    Column("ttft_ms", Float, nullable=True),
    Column("started_at", Float, nullable=False),
    Column("finished_at", Float, nullable=False),
    Index("ix_usage_started_at", "started_at"),
)

MIGRATIONS = Path(__file__).parent / "migrations"


@dataclass(frozen=True)
class CounterRow:
    subject: str
    period: str
    start: int
    requests: int
    tokens: int


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def open_engine(url: str) -> AsyncEngine:
    """An engine for the URL; SQLite files get their directory, WAL and a busy timeout."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": 10})
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    return create_async_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)


def _upgrade(connection: Connection, revision: str) -> None:
    if connection.dialect.name == "postgresql":
        # Replicas starting together migrate one after the other.
        connection.execute(text("SELECT pg_advisory_xact_lock(7406116)"))
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    command.upgrade(config, revision)


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    """Bring the schema to `revision` (alembic), in one transaction."""
    async with engine.begin() as connection:
        await connection.run_sync(_upgrade, revision)


class CounterStore:
    """Atomic fixed-window counters shared by all replicas using the database."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._dialect = engine.dialect.name

    async def bump(
        self,
        rows: Sequence[tuple[str, str, int, int, int]],
        connection: AsyncConnection | None = None,
    ) -> list[CounterRow]:
        """Add (requests, tokens) to each (subject, period, start) row; return the new totals.

        Rows must be unique per (subject, period, start): one statement cannot touch a row
        twice on PostgreSQL.
        """
        if not rows:
            return []
        insert = postgresql.insert if self._dialect == "postgresql" else sqlite.insert
        values = [
            {"subject": s, "period": p, "start": t, "requests": r, "tokens": k}
            for s, p, t, r, k in rows
        ]
        base = insert(rate_counters).values(values)
        statement = base.on_conflict_do_update(
            index_elements=["subject", "period", "start"],
            set_={
                "requests": rate_counters.c.requests + base.excluded.requests,
                "tokens": rate_counters.c.tokens + base.excluded.tokens,
            },
        ).returning(*rate_counters.c)
        if connection is not None:  # part of the caller's transaction
            result = await connection.execute(statement)
            return [CounterRow(*row) for row in result.all()]
        async with self._engine.connect() as own:
            result = await own.execute(statement)
            return [CounterRow(*row) for row in result.all()]

    async def prune(self, before: float) -> None:
        """Drop windows that ended long ago (the month window lasts at most 31 days)."""
        async with self._engine.connect() as connection:
            await connection.execute(
                rate_counters.delete().where(rate_counters.c.start < int(before))
            )


def merge_rows(
    rows: Iterable[tuple[str, str, int, int, int]],
) -> list[tuple[str, str, int, int, int]]:
    """Sum rows with the same (subject, period, start) so one statement touches each once."""
    merged: dict[tuple[str, str, int], list[int]] = {}
    for subject, period, start, requests, tokens in rows:
        total = merged.setdefault((subject, period, start), [0, 0])
        total[0] += requests
        total[1] += tokens
    return [(s, p, t, r, k) for (s, p, t), (r, k) in merged.items()]
