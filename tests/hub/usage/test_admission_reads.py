"""A replica that does not know a subject yet (just started) reads its shared totals once,
however many of its requests arrive at once; a failed read leaves the waiters to read for
themselves. Real CounterStore on SQLite, its bump() counted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from hub.auth import Principal
from hub.config import LimitsConfig
from hub.errors import ApiError
from hub.usage.admission import Admission
from hub.usage.counters import CounterRow, CounterStore, Row
from hub.usage.window_book import WindowBook

NOON = 1_800_000_000.0 - 1_800_000_000.0 % 86400 + 43200
LIMITS = LimitsConfig(requests_per_day=1000)


def user(name: str) -> Principal:
    return Principal(f"k-{name}", name, None, None, None, LIMITS)


class CountedStore:
    """The real store; reads (bumps that add nothing) counted, held until released."""

    def __init__(self, store: CounterStore) -> None:
        self.store = store
        self.reads: list[set[str]] = []
        self.release = asyncio.Event()
        self.fail_next = False

    async def bump(self, rows: Sequence[Row]) -> list[CounterRow]:
        if all(row[3] == 0 for row in rows):
            self.reads.append({row[0] for row in rows})
            await self.release.wait()
            if self.fail_next:
                self.fail_next = False
                raise OSError("database is locked")
        return await self.store.bump(rows)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[CountedStore]:
    real = await CounterStore.open(f"sqlite+aiosqlite:///{tmp_path / 'hub.db'}")
    await real._backend.fetch(
        "CREATE TABLE rate_counters (subject TEXT, period TEXT, start INTEGER, "
        "requests INTEGER, tokens INTEGER, PRIMARY KEY (subject, period, start))",
        [],
    )
    try:
        yield CountedStore(real)
    finally:
        await real.aclose()


async def test_fifty_requests_of_an_unknown_user_read_its_totals_once(
    store: CountedStore,
) -> None:
    admission = Admission(store, book=WindowBook())  # type: ignore[arg-type]
    asked = [asyncio.create_task(admission.admit(user("ann"), NOON)) for _ in range(50)]
    asked.append(asyncio.create_task(admission.admit(user("bob"), NOON)))
    await asyncio.sleep(0.05)
    store.release.set()
    answers = await asyncio.gather(*asked)
    assert sorted(map(sorted, store.reads)) == [["user:ann"], ["user:bob"]]
    remaining = sorted(int(h["X-RateLimit-Remaining-Day"]) for h in answers[:50])
    assert remaining == list(range(950, 1000))  # every request counted once


async def test_when_the_reading_request_is_cancelled_the_others_read_and_go_on(
    store: CountedStore,
) -> None:
    """The request that reads for all may be cancelled (its client went away)."""
    admission = Admission(store, book=WindowBook())  # type: ignore[arg-type]
    reader = asyncio.create_task(admission.admit(user("ann"), NOON))
    await asyncio.sleep(0.05)
    waiting = [asyncio.create_task(admission.admit(user("ann"), NOON)) for _ in range(5)]
    await asyncio.sleep(0.05)
    reader.cancel()
    await asyncio.sleep(0.05)
    store.release.set()
    answers = await asyncio.wait_for(asyncio.gather(*waiting), 10)
    assert reader.cancelled()
    assert len(store.reads) == 2  # the cancelled read, then one for the five waiters
    assert sorted(int(h["X-RateLimit-Remaining-Day"]) for h in answers) == list(range(995, 1000))


async def test_when_the_shared_read_fails_every_waiter_gets_the_503(store: CountedStore) -> None:
    admission = Admission(store, book=WindowBook())  # type: ignore[arg-type]
    store.fail_next = True
    asked = [asyncio.create_task(admission.admit(user("ann"), NOON)) for _ in range(5)]
    await asyncio.sleep(0.05)
    store.release.set()
    results = await asyncio.wait_for(asyncio.gather(*asked, return_exceptions=True), 10)
    assert all(isinstance(r, ApiError) and r.status == 503 for r in results)
