"""The key cache reads the database once per key at a time: a burst of requests of one key
arriving while its entry has expired shares one read (on SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio

from sqlalchemy.ext.asyncio import AsyncEngine

from hub.config import LimitsConfig
from hub.key_store import KeyCache, KeyRecord, KeyStore


class CountingStore(KeyStore):
    """The real store, counting its reads."""

    reads = 0

    async def get(self, key_id: str) -> KeyRecord | None:
        self.reads += 1
        return await super().get(key_id)


async def test_a_burst_after_expiry_shares_one_read(engine: AsyncEngine) -> None:
    store = CountingStore(engine)
    now = 1_000_000.0
    record, new = await store.create(name="k", now=now, limits=LimitsConfig())
    cache = KeyCache(store, ttl=5.0)
    first = await asyncio.gather(*(cache.lookup(new.secret, now) for _ in range(200)))
    assert first == [record] * 200 and store.reads == 1
    again = await asyncio.gather(*(cache.lookup(new.secret, now + 6) for _ in range(200)))
    assert again == [record] * 200 and store.reads == 2  # expired: one read for the burst


async def test_a_cancelled_caller_leaves_the_read_to_the_others(engine: AsyncEngine) -> None:
    store = CountingStore(engine)
    now = 1_000_000.0
    record, new = await store.create(name="k", now=now, limits=LimitsConfig())
    cache = KeyCache(store, ttl=5.0)
    first = asyncio.create_task(cache.lookup(new.secret, now))
    second = asyncio.create_task(cache.lookup(new.secret, now))
    await asyncio.sleep(0)
    first.cancel()
    assert await second == record
    assert first.cancelled() and store.reads == 1
