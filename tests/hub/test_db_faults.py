"""Database faults on the hub: a locked SQLite, a stopped PostgreSQL, hostile usage values.

Real databases only: the lock is a second connection's `BEGIN EXCLUSIVE`, the outage a
PostgreSQL server stopped and restarted by pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite
import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from hub.config import HubConfig, LimitsConfig
from hub.services import health_report
from hub.storage import open_engine, rate_counters, upgrade, usage
from hub.usage.accounting import UsageRecorder, WriterStatus
from hub.usage.counters import CounterStore
from hub.usage.limits import window_bounds
from hub.usage.records import MAX_COUNT, UsageRecord
from saia.sandbox.postgres import PostgresSandbox, find_bin_dir
from tests.fixtures.standin import STANDIN_MODEL
from tests.hpc.helpers import until, wait_healthy
from tests.hub.helpers import ADMIN_TOKEN, RunningHub, hub_config, running_hub

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


@pytest.mark.faults
async def test_a_lock_during_the_counter_prune_does_not_kill_accounting(
    tmp_path: Path,
    standin_server: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr("hub.usage.accounting.PRUNE_INTERVAL", 0.0)  # prune after every flush
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


async def test_a_request_refused_by_the_concurrency_cap_uses_no_window(
    tmp_path: Path, standin_factory: Any
) -> None:
    slow = standin_factory("slow", token_delay=0.1)
    async with running_hub(hub_config(tmp_path, slow.url, "slow")) as hub:
        key = await hub.create_key(limits=LimitsConfig(concurrent=1, requests_per_day=2))
        body = {"model": "slow", "prompt": "a b c d e f", "max_tokens": 6}
        async with hub.client(key) as http:
            first = asyncio.create_task(http.post("/v1/completions", json=body))
            await until(lambda: hub.services.admission.in_flight, 10, "the first never started")
            refused = await http.post("/v1/completions", json=body)
            assert (await first).status_code == 200
            third = await http.post("/v1/completions", json=body)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "concurrency_limit_exceeded"
        assert third.status_code == 200, third.text  # two counted of two allowed per day
        assert third.headers["x-ratelimit-remaining-day"] == "0"


def outage_config(
    tmp_path: Path, upstream: str, database_url: str | None = None, sync: float = 0
) -> HubConfig:
    # Keys stay cached through the outage; the writer flushes often. Rate counters in the
    # database by default (limited keys get 503); `sync` > 0: counted in memory.
    return hub_config(
        tmp_path, upstream, STANDIN_MODEL, database_url,
        auth={"key_cache_ttl": 300}, counter_sync_interval=sync,
    )  # fmt: skip


def patient(hub: RunningHub, key: str) -> httpx.AsyncClient:
    """A client that outwaits the first request of an outage (SQLite's busy timeout)."""
    headers = {"authorization": f"Bearer {key}"}
    return httpx.AsyncClient(base_url=hub.url, headers=headers, trust_env=False, timeout=30)


async def outage_checks(hub: RunningHub, limited: str, free: str) -> tuple[str, str]:
    """While the database is unavailable: limited key 503 (fail fast after the first),
    cached unlimited key served, /health 503 with the reason. The served request's id."""
    async with patient(hub, limited) as http:
        first = await http.post("/v1/completions", json=BODY)
        second = await http.post("/v1/completions", json=BODY)
        health = await http.get("/health")
    async with patient(hub, free) as http:
        served = await http.post("/v1/completions", json=BODY)
    for refused in (first, second):
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"].isdigit()
        error = refused.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "database_unavailable"
    assert health.status_code == 503
    assert health.json()["database"] == "unavailable" and health.json()["reason"]
    assert served.status_code == 200, served.text
    return first.headers.get("x-request-id", ""), served.headers["x-request-id"]


async def after_outage_checks(
    hub: RunningHub, limited: str, served_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The outage over: /health 200, the limited key served, the usage of the request served
    meanwhile written; one warning for the outage, no traceback."""
    async with patient(hub, limited) as http:
        await wait_healthy(http, limit_s=30)
        again = await http.post("/v1/completions", json=BODY)
    assert again.status_code == 200, again.text
    await until(lambda: hub.services.recorder.pending == 0, 30, "the queued usage not written")
    rows = await stored(hub.services.engine)
    assert served_id in rows and again.headers["x-request-id"] in rows
    warnings = [r for r in caplog.records if "database unavailable" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert hub.services.recorder.status().dropped == 0


@pytest.mark.faults
async def test_a_locked_sqlite_gives_503_and_loses_no_usage(
    tmp_path: Path, standin_server: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_hub(outage_config(tmp_path, standin_server)) as hub:
        limited = await hub.create_key(limits=LimitsConfig(requests_per_day=1000))
        free = await hub.create_key()
        for key in (limited, free):  # both keys in the key cache
            async with hub.client(key) as http:
                assert (await http.post("/v1/completions", json=BODY)).status_code == 200
        async with sqlite_locked(sqlite_path(hub)):
            _, served_id = await outage_checks(hub, limited, free)
            async with patient(hub, ADMIN_TOKEN) as http:
                summary = await http.get("/admin/usage", params={"since": "2026-01-01"})
            assert summary.status_code == 503, summary.text  # not a 500 with a traceback
            assert summary.json()["error"]["code"] == "database_unavailable"
        await after_outage_checks(hub, limited, served_id, caplog)


@pytest.fixture
def own_postgres() -> Iterator[PostgresSandbox]:
    """A PostgreSQL server of this test alone: the test stops and restarts it."""
    if find_bin_dir() is None:
        pytest.skip("PostgreSQL is not installed")
    sandbox = PostgresSandbox()
    try:
        sandbox.start()
        yield sandbox
    finally:
        sandbox.stop()


@pytest.mark.postgres
@pytest.mark.faults
async def test_a_stopped_postgresql_gives_503_and_loses_no_usage(
    tmp_path: Path,
    standin_server: str,
    own_postgres: PostgresSandbox,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = own_postgres.create_database("hub")
    async with running_hub(outage_config(tmp_path, standin_server, url)) as hub:
        limited = await hub.create_key(limits=LimitsConfig(requests_per_day=1000))
        free = await hub.create_key()
        for key in (limited, free):  # both keys in the key cache
            async with hub.client(key) as http:
                assert (await http.post("/v1/completions", json=BODY)).status_code == 200
        # Blocking sandbox calls (stop by pid, wait until ready) off the hub's event loop.
        await asyncio.to_thread(own_postgres.stop_server)
        try:
            _, served_id = await outage_checks(hub, limited, free)
        finally:
            await asyncio.to_thread(own_postgres.start_server)
        await after_outage_checks(hub, limited, served_id, caplog)


async def test_a_backlog_is_written_in_bounded_batches(
    engine: AsyncEngine, counters: CounterStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("hub.usage.accounting.MAX_BATCH", 3)
    recorder = UsageRecorder(engine, counters, interval=60)
    for index in range(10):
        recorder.record(usage_record(f"r{index}"), ("key:x",))
    assert await recorder.flush() == 10 and recorder.pending == 0
    assert len(await stored(engine)) == 10
    assert await day_tokens(engine, "key:x") == 10 * 7


async def test_the_unique_request_id_migration_keeps_one_row_of_each(database_url: str) -> None:
    engine = open_engine(database_url)
    try:
        await upgrade(engine, "0001")
        row = {k: v for k, v in vars(usage_record("dup")).items()}
        async with engine.begin() as connection:
            await connection.execute(usage.insert(), [row, row, {**row, "request_id": "one"}])
        await upgrade(engine)
        assert await stored(engine) == {"dup": 5, "one": 5}
        async with engine.connect() as connection:
            count = select(func.count()).select_from(usage)
            assert (await connection.execute(count)).scalar() == 2
    finally:
        await engine.dispose()


async def test_a_cancelled_flush_releases_its_connection_and_keeps_its_records(
    tmp_path: Path,
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'hub.db'}"
    engine = open_engine(url)
    await upgrade(engine)
    counters = await CounterStore.open(url)
    try:
        recorder = UsageRecorder(engine, counters, interval=60)
        recorder.record(usage_record("kept"), ("key:x",))
        async with sqlite_locked(tmp_path / "hub.db"):
            flushing = asyncio.create_task(recorder.flush())
            await until(lambda: engine.pool.checkedout() == 1, 10, "the flush took no connection")
            flushing.cancel()
            async with asyncio.timeout(20):
                with contextlib.suppress(asyncio.CancelledError):
                    await flushing
            assert flushing.cancelled()
        await until(lambda: engine.pool.checkedout() == 0, 20, "the connection was not released")
        assert recorder.pending == 1
        assert await recorder.flush() == 1
        assert await stored(engine) == {"kept": 5}
        assert await day_tokens(engine, "key:x") == 7
    finally:
        await counters.aclose()
        await engine.dispose()


def test_health_report_says_why() -> None:
    writer = WriterStatus(True, 0, 0.0, 0, 0, None)
    assert health_report(None, "", writer, 1.0, 100.0) == (
        200,
        {"status": "ok", "database": "ok", "usage": {"pending": 0, "dropped": 0, "rejected": 0}},
    )
    status, body = health_report(40.0, "rate counters: locked", writer, 1.0, 100.0)
    assert (
        status == 503 and body["reason"] == "database unavailable for 60 s (rate counters: locked)"
    )
    behind = WriterStatus(True, 7, 31.0, 2, 0, None)
    status, body = health_report(None, "", behind, 1.0, 100.0)
    assert status == 503 and "7 records waiting" in body["reason"]
    assert body["usage"]["dropped"] == 2
    failing = WriterStatus(True, 1, 1.0, 0, 0, "usage writer: DataError: x")
    assert "usage writer failing" in health_report(None, "", failing, 1.0, 100.0)[1]["reason"]
    stopped = WriterStatus(False, 0, 0.0, 0, 0, None)
    assert health_report(None, "", stopped, 1.0, 100.0)[1]["reason"] == "usage writer stopped"
