"""Hub test fixtures: a database URL for SQLite and (marker `postgres`) PostgreSQL, an
engine on it with the schema migrated, and the counter store on that schema."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from hub.storage import open_engine, upgrade
from hub.usage.counters import CounterStore


@pytest.fixture(
    params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'hub.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = open_engine(database_url)
    try:
        await upgrade(engine)
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
async def counters(engine: AsyncEngine, database_url: str) -> AsyncIterator[CounterStore]:
    store = await CounterStore.open(database_url)
    try:
        yield store
    finally:
        await store.aclose()
