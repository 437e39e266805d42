"""Database faults on the hub: a locked SQLite, a stopped PostgreSQL, hostile usage values.

Real databases only: the lock is a second connection's `BEGIN EXCLUSIVE`, the outage a
PostgreSQL server stopped and restarted by pid.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiosqlite
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from hub.accounting import UsageRecorder
from hub.config import LimitsConfig
from hub.counters import CounterStore
from hub.limits import window_bounds
from hub.storage import open_engine, rate_counters, upgrade, usage
from hub.usage_records import MAX_COUNT, UsageRecord
from tests.fixtures.standin import STANDIN_MODEL
from tests.hpc.helpers import until, wait_healthy
from tests.hub.helpers import RunningHub, hub_config, running_hub

BODY = {"model": STANDIN_MODEL, "prompt": "a b c", "max_tokens": 2}


@asynccontextmanager
async def sqlite_locked(path: Path) -> AsyncIterator[None]:
    """A second connection holds the database's write lock until the block ends."""
    async with aiosqlite.connect(path, isolation_level=None) as connection:
        await connection.execute("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            await connection.execute("ROLLBACK")


def sqlite_path(hub: RunningHub) -> Path:
    url = hub.services.config.database
    assert url.startswith("sqlite+aiosqlite:///")
    return Path(url.removeprefix("sqlite+aiosqlite:///"))


def flusher_alive() -> bool:
    return any(task.get_name() == "usage-flusher" for task in asyncio.all_tasks())


async def test_a_lock_during_the_counter_prune_does_not_kill_accounting(
    tmp_path: Path,
    standin_server: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr("hub.accounting.PRUNE_INTERVAL", 0.0)  # prune after every flush
    config = hub_config(tmp_path, standin_server, STANDIN_MODEL)
    async with running_hub(config) as hub:
        key = await hub.create_key(limits=LimitsConfig(requests_per_minute=100))
        async with sqlite_locked(sqlite_path(hub)):
            await until(
                lambda: not flusher_alive() or "prun" in caplog.text,
                30,
                "no prune attempt failed under the lock",
            )
        async with hub.client(key) as http:
            await wait_healthy(http)  # the writer's next probe ends the outage
            answer = await http.post("/v1/completions", json=BODY)
        assert answer.status_code == 200, answer.text
        assert flusher_alive()
        request_id = answer.headers["x-request-id"]
        await until(lambda: hub.services.recorder.pending == 0, 30, "usage not written")
        assert request_id in await stored(hub.services.engine)


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


def usage_record(request_id: str, prompt_tokens: int = 5) -> UsageRecord:
    now = time.time()
    return UsageRecord(
        request_id=request_id, key_id=None, user_name="u", group_name=None, model="m",
        upstream="u", endpoint="completions", status=200, stream=False,
        prompt_tokens=prompt_tokens, completion_tokens=2, latency_ms=10.0, ttft_ms=None,
        started_at=now, finished_at=now,
    )  # fmt: skip


async def stored(engine: AsyncEngine) -> dict[str, int]:
    async with engine.connect() as connection:
        rows = await connection.execute(select(usage.c.request_id, usage.c.prompt_tokens))
        return {row.request_id: row.prompt_tokens for row in rows}


async def day_tokens(engine: AsyncEngine, subject: str) -> int:
    day = window_bounds("day", time.time())[0]
    query = select(rate_counters.c.tokens).where(
        rate_counters.c.subject == subject,
        rate_counters.c.period == "day",
        rate_counters.c.start == day,
    )
    async with engine.connect() as connection:
        return int((await connection.execute(query)).scalar_one())


async def test_a_usage_of_2_64_is_clamped_and_the_writer_lives_on(
    engine: AsyncEngine, counters: CounterStore, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = UsageRecorder(engine, counters, interval=0.05)
    async with recorder.running():
        recorder.record(usage_record("huge", prompt_tokens=2**64), ("key:x",))
        recorder.record(usage_record("normal"), ("key:x",))
        await until(lambda: recorder.pending == 0, 20, "the usage was not written")
        assert flusher_alive()
        recorder.record(usage_record("after"), ("key:x",))
        await until(lambda: recorder.pending == 0, 20, "the writer stopped writing")
    assert await stored(engine) == {"huge": MAX_COUNT, "normal": 5, "after": 5}
    assert await day_tokens(engine, "key:x") == MAX_COUNT + 2 + 7 + 7
    assert "usage record huge: prompt_tokens out of range, stored clamped" in caplog.text


async def test_a_request_written_twice_is_stored_and_counted_once(
    engine: AsyncEngine, counters: CounterStore
) -> None:
    """A batch is written again when its commit's answer was lost (connection dropped):
    the second write must change nothing."""
    recorder = UsageRecorder(engine, counters, interval=60)
    for _ in range(2):
        recorder.record(usage_record("same"), ("key:x",))
        await recorder.flush()
    recorder.record(usage_record("other"), ("key:x",))
    recorder.record(usage_record("other"), ("key:x",))  # twice in one batch too
    await recorder.flush()
    assert await stored(engine) == {"same": 5, "other": 5}
    async with engine.connect() as connection:
        assert (await connection.execute(select(func.count()).select_from(usage))).scalar() == 2
    assert await day_tokens(engine, "key:x") == 2 * 7
