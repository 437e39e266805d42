"""Rate limits decided in memory: the pure admit decision and the book's bookkeeping."""

from __future__ import annotations

from datetime import UTC, datetime

from hub.config import LimitsConfig
from hub.usage.counters import CounterRow
from hub.usage.limits import Shared, Window, decide, local_counts, window_starts
from hub.usage.window_book import WindowBook

NOW = datetime(2026, 12, 31, 23, 59, 30, tzinfo=UTC).timestamp()
STARTS = window_starts(NOW)
NEXT_MINUTE = window_starts(NOW + 60)
PER_MINUTE = LimitsConfig(requests_per_minute=10)


def totals(subject: str, requests: int, tokens: int = 0, now: float = NOW) -> list[CounterRow]:
    return [CounterRow(subject, w, s, requests, tokens) for w, s in window_starts(now).items()]


def test_a_request_sees_the_shared_total_plus_its_replicas_unsynced_requests() -> None:
    shared: dict[Window, Shared] = {"minute": Shared(STARTS["minute"], 7, 0)}
    counts = local_counts(shared, {"minute": 2}, STARTS)
    assert counts.requests["minute"] == 10  # 7 shared + 2 here + this one
    assert decide([(PER_MINUTE, counts)], NOW).allowed
    over = local_counts(shared, {"minute": 3}, STARTS)
    refused = decide([(PER_MINUTE, over)], NOW)
    assert not refused.allowed and refused.headers["Retry-After"] == "30"


def test_a_window_that_began_after_the_last_sync_starts_from_nothing() -> None:
    shared: dict[Window, Shared] = {
        "minute": Shared(STARTS["minute"], 10, 0),
        "day": Shared(STARTS["day"], 5, 900),
    }
    counts = local_counts(shared, {"minute": 1}, NEXT_MINUTE)
    assert counts.requests["minute"] == 2  # the new minute: 1 unsynced + this one
    assert counts.requests["day"] == 1 and counts.tokens["day"] == 0  # a new day (and year)
    assert local_counts(shared, {}, STARTS).tokens["day"] == 900


def test_a_single_replica_counts_exactly_through_syncs() -> None:
    book = WindowBook()
    book.install(totals("key:a", 4), NOW)  # what the database had: 4 this minute
    for _ in range(3):
        book.add("key:a", STARTS, NOW)
    assert book.counts("key:a", STARTS).requests["minute"] == 8
    rows = book.take(STARTS, NOW)
    assert ("key:a", "minute", STARTS["minute"], 3, 0) in rows
    book.add("key:a", STARTS, NOW)  # counted while the sync is in flight
    assert book.counts("key:a", STARTS).requests["minute"] == 9
    book.settled(rows, totals("key:a", 7))  # the database: 4 + the 3 sent
    assert book.counts("key:a", STARTS).requests["minute"] == 9
    assert book.unsynced == 4  # one request in each of the four windows


def test_other_replicas_counts_arrive_with_the_sync() -> None:
    book = WindowBook()
    book.install(totals("key:a", 0), NOW)
    book.add("key:a", STARTS, NOW)
    rows = book.take(STARTS, NOW)
    book.settled(rows, totals("key:a", 6))  # 1 of ours, 5 of another replica's
    assert book.counts("key:a", STARTS).requests["minute"] == 7


def test_a_failed_sync_keeps_its_counts_for_the_next() -> None:
    book = WindowBook()
    book.install(totals("key:a", 2), NOW)
    book.add("key:a", STARTS, NOW)
    first = book.take(STARTS, NOW)
    book.requeue(first)
    assert book.counts("key:a", STARTS).requests["minute"] == 4
    again = book.take(STARTS, NOW)
    assert sorted(again) == sorted(first)


def test_idle_subjects_get_zero_rows_and_are_forgotten_later() -> None:
    book = WindowBook(idle_after=60)
    book.install(totals("key:a", 2), NOW)
    rows = book.take(STARTS, NOW + 1)
    assert {row[3] for row in rows} == {0} and len(rows) == 4  # read, add nothing
    assert book.known("key:a")
    assert book.take(STARTS, NOW + 61) == [] and not book.known("key:a")


def test_a_late_read_does_not_lower_a_total() -> None:
    book = WindowBook()
    book.install(totals("key:a", 5), NOW)
    book.install(totals("key:a", 3), NOW)  # a read that started earlier
    assert book.counts("key:a", STARTS).requests["minute"] == 6


def test_tokens_written_here_count_at_once() -> None:
    book = WindowBook()
    book.install(totals("key:a", 1, tokens=100), NOW)
    book.tokens_written([("key:a", "day", STARTS["day"], 0, 50), ("key:b", "day", 0, 0, 9)])
    assert book.counts("key:a", STARTS).tokens["day"] == 150
    assert not book.known("key:b")
