"""Storage on SQLite and PostgreSQL: migrations, keys, atomic counters, batched usage, and
limits shared by two hub replicas on one database."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from sqlalchemy import inspect, select
from sqlalchemy.ext.asyncio import AsyncEngine

from hub.config import LimitsConfig
from hub.key_store import KeyCache, KeyStore
from hub.storage import rate_counters, upgrade, usage
from hub.usage.accounting import UsageRecord, UsageRecorder, usage_summary
from hub.usage.counters import CounterStore
from hub.usage.limits import window_bounds
from tests.fixtures.standin import STANDIN_MODEL
from tests.hub.helpers import hub_config, running_hub


async def test_migrations_create_the_schema_and_are_idempotent(engine: AsyncEngine) -> None:
    await upgrade(engine)  # a second run changes nothing
    async with engine.connect() as connection:
        tables = await connection.run_sync(lambda c: set(inspect(c).get_table_names()))
    assert {"api_keys", "rate_counters", "usage", "alembic_version"} <= tables


async def test_keys_round_trip_and_revocation_within_cache_ttl(engine: AsyncEngine) -> None:
    store = KeyStore(engine)
    now = 1_000_000.0
    record, new = await store.create(
        name="k", now=now, owner="alice", group="lab", allowed_models=["m"],
        limits=LimitsConfig(requests_per_minute=5),
    )  # fmt: skip
    assert new.secret.startswith("sk-saia-") and new.secret not in str(record.public())
    assert (await store.get(record.id)) == record
    assert [r.id for r in await store.list()] == [record.id]
    cache = KeyCache(store, ttl=5.0)
    assert await cache.lookup(new.secret, now) == record
    wrong = new.secret[:-1] + ("B" if new.secret.endswith("A") else "A")  # always another key
    assert await cache.lookup(wrong, now) is None
    assert await store.revoke(record.id, now + 1)
    assert not await store.revoke(record.id, now + 1)  # already revoked
    cached = await cache.lookup(new.secret, now + 2)
    assert cached is not None and cached.problem(now + 2) is None  # still cached
    fresh = await cache.lookup(new.secret, now + 6)
    assert fresh is not None and fresh.problem(now + 6) == "this API key has been revoked"
    assert await store.set_limits(record.id, LimitsConfig(concurrent=1))
    updated = await store.get(record.id)
    assert updated is not None and updated.limits == LimitsConfig(concurrent=1)


async def test_counter_increments_are_atomic(counters: CounterStore) -> None:
    rows = [("key:a", "minute", 60, 1, 0), ("key:a", "day", 0, 1, 0)]
    results = await asyncio.gather(*(counters.bump(rows) for _ in range(40)))
    minute = sorted(r.requests for result in results for r in result if r.period == "minute")
    assert minute == list(range(1, 41))  # every increment saw its own total


async def test_usage_batches_and_summary(engine: AsyncEngine, counters: CounterStore) -> None:
    recorder = UsageRecorder(engine, counters, interval=0.05)
    now = time.time()
    async with recorder.running():
        for index in range(30):
            recorder.record(_record(f"r{index}", "alice" if index % 3 else "bob", now), ("u:x",))
        for _ in range(100):
            if recorder.pending == 0:
                break
            await asyncio.sleep(0.02)
    async with engine.connect() as connection:
        stored = (await connection.execute(select(usage.c.request_id))).all()
        tokens = (await connection.execute(select(rate_counters))).all()
    assert len(stored) == 30
    day_start = window_bounds("day", now)[0]
    assert {(r.period, r.start, r.tokens) for r in tokens} >= {("day", day_start, 30 * 7)}
    summary = await usage_summary(engine, since=now - 10, until=None, by="user")
    assert [(s["user"], s["requests"], s["prompt_tokens"]) for s in summary] == [
        ("alice", 20, 100),
        ("bob", 10, 50),
    ]
    assert await usage_summary(engine, since=now + 10, until=None, by="model") == []


async def test_recorder_flushes_on_shutdown(engine: AsyncEngine, counters: CounterStore) -> None:
    recorder = UsageRecorder(engine, counters, interval=60)
    async with recorder.running():
        recorder.record(_record("last", "carol", time.time()))
    async with engine.connect() as connection:
        assert (await connection.execute(select(usage.c.request_id))).scalars().all() == ["last"]


async def test_two_replicas_share_one_limit(
    tmp_path: Path, database_url: str, standin_server: str
) -> None:
    # Exact mode: every request counted in the database (the batched mode's bound is
    # tested in tests/hub/usage/test_window_sync.py).
    config = hub_config(
        tmp_path, standin_server, STANDIN_MODEL, database_url, counter_sync_interval=0
    )
    body = {"model": STANDIN_MODEL, "prompt": "a", "max_tokens": 1}
    async with running_hub(config) as first, running_hub(config) as second:
        key = await first.create_key(limits=LimitsConfig(requests_per_hour=5))
        statuses = []
        for index in range(8):
            replica = (first, second)[index % 2]
            async with replica.client(key) as http:
                statuses.append((await http.post("/v1/completions", json=body)).status_code)
    assert statuses == [200] * 5 + [429] * 3


def _record(request_id: str, user: str, now: float) -> UsageRecord:
    return UsageRecord(
        request_id=request_id, key_id=None, user_name=user, group_name=None, model="m",
        upstream="u", endpoint="completions", status=200, stream=False, prompt_tokens=5,
        completion_tokens=2, latency_ms=10.0, ttft_ms=None, started_at=now, finished_at=now,
    )  # fmt: skip


async def test_old_counter_windows_are_pruned(counters: CounterStore) -> None:
    await counters.bump([("key:a", "day", 1000, 1, 0), ("key:a", "day", 5000, 1, 0)])
    await counters.prune(before=2000)
    left = await counters.bump([("key:a", "day", 1000, 0, 0), ("key:a", "day", 5000, 0, 0)])
    assert sorted((row.start, row.requests) for row in left) == [(1000, 0), (5000, 1)]
