"""Rate-limit windows counted in memory and shared in batches (issue 11, item 8), on real
databases and real hubs: two replicas on one PostgreSQL, a restart, a cancelled sync and a
database outage.

Where the numbers must be exact, the hubs' periodic sync is made slower than the test
(60 s) and the test syncs them itself: what each replica knows is then known exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from hub.config import HubConfig, LimitsConfig
from hub.services import health_report
from hub.storage import open_engine, rate_counters, upgrade
from hub.usage.accounting import WriterStatus
from hub.usage.counters import CounterStore
from hub.usage.limits import WINDOWS, window_bounds, window_starts
from hub.usage.window_book import WindowBook
from hub.usage.window_sync import CounterSync, SyncStatus
from tests.fixtures.standin import STANDIN_MODEL
from tests.hpc.helpers import until, wait_healthy
from tests.hub.helpers import RunningHub, hub_config, running_hub
from tests.hub.test_db_faults import patient, sqlite_locked, sqlite_path

BODY = {"model": STANDIN_MODEL, "prompt": "a", "max_tokens": 1}
BY_HAND = 60.0  # a periodic sync slower than any test here: the test syncs


def config(tmp_path: Path, upstream: str, url: str | None, interval: float) -> HubConfig:
    return hub_config(
        tmp_path, upstream, STANDIN_MODEL, url,
        counter_sync_interval=interval, auth={"key_cache_ttl": 300},
    )  # fmt: skip


async def send(hub: RunningHub, key: str, count: int) -> list[int]:
    async with hub.client(key) as http:
        return [(await http.post("/v1/completions", json=BODY)).status_code for _ in range(count)]


async def sync_all(*hubs: RunningHub) -> None:
    """Two rounds: afterwards every replica has read every other's counts."""
    for _ in range(2):
        for hub in hubs:
            sync = hub.services.counter_sync
            assert sync is not None
            assert await sync.sync()


async def hour_requests(engine: AsyncEngine, prefix: str = "key:") -> int:
    start = window_bounds("hour", time.time())[0]
    column = rate_counters.c
    statement = select(column.requests).where(
        column.period == "hour", column.start == start, column.subject.like(f"{prefix}%")
    )
    async with engine.connect() as connection:
        return sum((await connection.execute(statement)).scalars())


@pytest.mark.postgres
async def test_two_replicas_share_a_window_within_the_documented_bound(
    tmp_path: Path, postgres_url: str, standin_server: str
) -> None:
    settings = config(tmp_path, standin_server, postgres_url, BY_HAND)
    async with running_hub(settings) as a, running_hub(settings) as b:
        key = await a.create_key(limits=LimitsConfig(requests_per_hour=10))
        # Neither has synced: each knows only its own four (and the empty window it read).
        assert await send(a, key, 4) + await send(b, key, 4) == [200] * 8
        await sync_all(a, b)  # both know 8 now
        assert await send(a, key, 5) == [200, 200, 429, 429, 429]
        # b has not read a's last two: it admits two more. The overshoot is exactly what
        # the other replica admitted since b last read the shared totals.
        refused = await send(b, key, 5)
        assert refused == [200, 200, 429, 429, 429]
        await sync_all(a, b)
        assert await send(a, key, 3) + await send(b, key, 3) == [429] * 6
        assert await hour_requests(a.services.engine) == 12  # each admitted request, once


@pytest.mark.postgres
async def test_periodic_syncs_stop_both_replicas_at_the_shared_limit(
    tmp_path: Path, postgres_url: str, standin_server: str
) -> None:
    settings = config(tmp_path, standin_server, postgres_url, 0.1)
    async with running_hub(settings) as a, running_hub(settings) as b:
        key = await a.create_key(limits=LimitsConfig(requests_per_hour=30))
        statuses = await asyncio.gather(*(send(hub, key, 15) for hub in (a, b, a, b)))
        admitted = sum(s.count(200) for s in statuses)
        # Each replica admits only while its own view is under the limit: at most N x 30.
        assert 30 <= admitted <= 60, statuses
        syncs = [hub.services.counter_sync.syncs for hub in (a, b)]  # type: ignore[union-attr]
        for hub, before in zip((a, b), syncs, strict=True):
            # Two more syncs each: both have read everything counted before.
            sync = hub.services.counter_sync
            await until(lambda s=sync, n=before: s.syncs >= n + 2, 30, "no periodic sync")  # type: ignore[misc]
        assert await send(a, key, 2) + await send(b, key, 2) == [429] * 4
        assert await hour_requests(a.services.engine) == admitted


async def test_a_restarted_hub_keeps_the_window(
    tmp_path: Path, database_url: str, standin_server: str
) -> None:
    settings = config(tmp_path, standin_server, database_url, BY_HAND)
    async with running_hub(settings) as first:
        key = await first.create_key(limits=LimitsConfig(requests_per_hour=5))
        assert await send(first, key, 3) == [200] * 3
    # Never synced while it ran: its last sync at shutdown wrote the three.
    async with running_hub(settings) as second:
        assert await send(second, key, 3) == [200, 200, 429]


async def waiting_on_a_lock(connection: asyncpg.Connection) -> int:
    count = await connection.fetchval(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    return int(count)


@pytest.mark.postgres
async def test_a_cancelled_sync_releases_its_connection_and_keeps_its_counts(
    postgres_url: str,
) -> None:
    engine = open_engine(postgres_url)
    await upgrade(engine)
    store = await CounterStore.open(postgres_url)
    dsn = make_url(postgres_url).set(drivername="postgresql").render_as_string(False)
    locker = await asyncpg.connect(dsn)
    try:
        now = time.time()
        starts = window_starts(now)
        book = WindowBook()
        book.install(await store.bump([("key:x", w, starts[w], 0, 0) for w in WINDOWS]), now)
        for _ in range(3):
            book.add("key:x", starts, now)
        sync = CounterSync(book, store, BY_HAND)
        async with locker.transaction():
            await locker.execute("LOCK TABLE rate_counters IN ACCESS EXCLUSIVE MODE")
            syncing = asyncio.create_task(sync.sync())
            await until(lambda: store.in_use == 1, 10, "the sync took no connection")
            for _ in range(100):  # until the statement waits for the lock (bounded)
                if await waiting_on_a_lock(locker):
                    break
                await asyncio.sleep(0.1)
            else:
                pytest.fail("the sync's statement never waited for the lock")
            syncing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await syncing
            assert syncing.cancelled()
            assert store.in_use == 0  # the connection is back in the pool
            assert await waiting_on_a_lock(locker) == 0  # and its statement is gone
        assert book.unsynced == 3 * len(WINDOWS)  # the counts wait for the next sync
        assert await sync.sync()
        assert await hour_requests(engine) == 3
    finally:
        await locker.close()
        await store.aclose()
        await engine.dispose()


async def test_during_an_outage_known_keys_stay_limited_by_each_replica(
    tmp_path: Path, standin_server: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_hub(config(tmp_path, standin_server, None, 0.2)) as hub:
        known = await hub.create_key(limits=LimitsConfig(requests_per_hour=4))
        unknown = await hub.create_key(limits=LimitsConfig(requests_per_hour=4))
        assert await send(hub, known, 1) == [200]
        async with patient(hub, unknown) as http:  # authenticated (cached), never counted
            assert (await http.get("/v1/models")).status_code == 200
        async with sqlite_locked(sqlite_path(hub)):
            sync = hub.services.counter_sync
            assert sync is not None
            await until(lambda: sync.status().failing, 30, "the sync never failed")
            assert await send(hub, known, 4) == [200, 200, 200, 429]
            async with patient(hub, unknown) as http:
                refused = await http.post("/v1/completions", json=BODY)
                health = await http.get("/health")
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "database_unavailable"
        assert health.status_code == 503
        assert "rate counters not shared" in health.json()["reason"]
        assert health.json()["rate_counters"]["unsynced"] > 0
        async with patient(hub, known) as http:
            await wait_healthy(http, limit_s=30)
        await until(lambda: sync.status().unsynced == 0, 30, "the counts were not synced")
        assert await hour_requests(hub.services.engine) == 4
        assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


def test_health_says_when_the_counters_are_not_shared() -> None:
    writer = WriterStatus(True, 0, 0.0, 0, 0, None)
    ok = SyncStatus(True, 3, None, None)
    status, body = health_report(None, "", writer, 1.0, 100.0, ok)
    assert status == 200 and body["rate_counters"] == {"unsynced": 3}
    failing = SyncStatus(True, 12, "rate counter sync: OSError: refused", 40.0)
    status, body = health_report(None, "", writer, 1.0, 100.0, failing)
    assert status == 503
    assert body["reason"] == (
        "rate counters not shared for 60 s (rate counter sync: OSError: refused): "
        "each replica enforces its own counts (12 unsynced)"
    )
    status, body = health_report(None, "", writer, 1.0, 100.0, SyncStatus(False, 0, None, None))
    assert status == 503 and body["reason"] == "rate counter sync stopped"


async def test_a_sync_forgets_idle_subjects_and_reads_the_others(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'hub.db'}"
    engine = open_engine(url)
    await upgrade(engine)
    store = await CounterStore.open(url)
    try:
        now = time.time()
        starts = window_starts(now)
        await store.bump([("key:busy", w, starts[w], 7, 0) for w in WINDOWS])  # elsewhere
        book = WindowBook(idle_after=60)
        book.install(await store.bump([("key:idle", "minute", starts["minute"], 0, 0)]), now - 61)
        book.install(await store.bump([("key:busy", "minute", starts["minute"], 0, 0)]), now)
        book.add("key:busy", starts, now)
        assert await CounterSync(book, store, BY_HAND).sync()
        assert not book.known("key:idle") and book.known("key:busy")
        assert book.counts("key:busy", starts).requests["hour"] == 9  # 7 + 1 + this one
    finally:
        await store.aclose()
        await engine.dispose()
