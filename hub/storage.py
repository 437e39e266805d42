"""The hub's database: keys, rate-limit counters and usage, via SQLAlchemy 2 async.

SQLite (aiosqlite) by default, PostgreSQL (asyncpg) by URL; the schema is created and
upgraded by alembic (`hub/migrations`). Rate counters (`hub/usage/counters.py`) live in the
same database.
"""

from __future__ import annotations

import logging
import os
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
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

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
    Index("ix_api_keys_owner", "owner"),
)

web_sessions = Table(
    "web_sessions",
    metadata,
    Column("digest", String(64), primary_key=True),  # sha256 of the cookie's value
    Column("user_name", String(200), nullable=False),
    Column("group_name", String(200), nullable=True),
    Column("admin", Boolean, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Index("ix_web_sessions_expires_at", "expires_at"),
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
    # A batch written again after a lost commit must not store (or count) a request twice.
    Index("ux_usage_request_id", "request_id", unique=True),
)

MIGRATIONS = Path(__file__).parent / "migrations"
BUSY_TIMEOUT = 10.0  # seconds SQLite waits for another writer before "database is locked"
CONNECT_TIMEOUT = 10.0  # seconds to open a PostgreSQL connection (asyncpg's default is 60)
# Prepared statements each SQLite connection keeps (Python's default: 128). Batched writes
# (usage rows, rate windows) are one statement per batch size, and a prepared insert of a
# few hundred rows takes ~200 KB of C memory: 128 of them made the hub's RSS grow by tens
# of MB over a 10-minute soak (python -m bench); 16 keep the hot single-row ones.
SQLITE_CACHED_STATEMENTS = 16


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT * 1000)}")
    cursor.close()


def _create_private(path: Path) -> None:
    """Create the SQLite file 0600 (in a 0700 directory if we make it) before SQLite does:
    it holds key digests and usage, and SQLite would create it with the umask (0644).
    Its -wal and -shm files take the database file's mode. An existing file is left as is.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))


def open_engine(url: str, *, autocommit: bool = False) -> AsyncEngine:
    """An engine for the URL; SQLite files get their directory, WAL and a busy timeout.

    `autocommit` engines run single statements without BEGIN/COMMIT or a reset when a
    connection goes back to the pool: one round trip per statement (the rate counters).
    """
    options: dict[str, Any] = {}
    if autocommit:
        options = {"isolation_level": "AUTOCOMMIT", "pool_reset_on_return": None}
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if autocommit:
            # SQLite runs one writer at a time: queueing on one connection in asyncio is far
            # cheaper than several connections sleeping in SQLite's busy handler.
            options.update(pool_size=1, max_overflow=0, pool_timeout=60)
        if parsed.database and parsed.database != ":memory:":
            _create_private(Path(parsed.database))
        connect_args = {"timeout": BUSY_TIMEOUT, "cached_statements": SQLITE_CACHED_STATEMENTS}
        engine = create_async_engine(url, connect_args=connect_args, **options)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    return create_async_engine(
        url, pool_size=20, max_overflow=40, pool_recycle=1800, pool_pre_ping=not autocommit,
        connect_args={"timeout": CONNECT_TIMEOUT}, **options,
    )  # fmt: skip


def _upgrade(connection: Connection, revision: str) -> None:
    if connection.dialect.name == "postgresql":
        # Replicas starting together migrate one after the other.
        connection.execute(text("SELECT pg_advisory_xact_lock(7406116)"))
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    command.upgrade(config, revision)


async def upgrade(engine: AsyncEngine, revision: str = "heads") -> None:
    """Bring the schema to `revision` (alembic; every branch's head by default), in one
    transaction."""
    async with engine.begin() as connection:
        await connection.run_sync(_upgrade, revision)
