"""Admission of one request: the per-replica in-flight cap, and shared rate-limit counters.

The cap is checked before the request is counted: a request the cap refuses does not use up
its request windows. Windows are counted one of two ways:

- in memory (a `WindowBook`, synced by `hub/usage/window_sync.py`): a request is decided against
  the last shared totals plus this replica's unsynced counts, without awaiting anything; a
  subject the book does not know yet (first request, restart, idle for a while) is read from
  the database first. During a database outage known subjects are still enforced, each
  replica on its own counts; an unknown one gets 503;
- exactly (no book, `counter_sync_interval: 0`): every request adds itself in the database
  (one statement) and is decided on the totals; during an outage it gets 503.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence

from hub.auth import Principal
from hub.config import LimitsConfig
from hub.db_health import DatabaseHealth
from hub.errors import ApiError
from hub.usage.counters import CounterStore, Row
from hub.usage.limits import (
    WINDOWS,
    Counts,
    Decision,
    Window,
    concurrency_allows,
    decide,
    needs_counting,
    window_starts,
)
from hub.usage.window_book import WindowBook

Counted = list[tuple[str, LimitsConfig]]

PRIORITY_HEADER = "x-saia-priority"
CLASSES = ("interactive", "batch")


def request_class(headers: Mapping[str, str]) -> str:
    """The class a request asks for with `X-Saia-Priority` ("" when it asks for none).

    A client may only ask; the agent's config may still make a key's requests batch. The
    class goes to the agent in the hop head, never as a header the agent would trust."""
    value = headers.get(PRIORITY_HEADER)
    if value is None:
        return ""
    wanted = value.strip().lower()
    if wanted not in CLASSES:
        raise ApiError(
            400,
            f"X-Saia-Priority must be one of {', '.join(CLASSES)}",
            param=PRIORITY_HEADER,
            code="invalid_priority",
        )
    return wanted


def _refused(decision: Decision) -> ApiError:
    return ApiError(
        429,
        decision.reason or "rate limit reached",
        code="rate_limit_exceeded",
        headers=decision.headers,
    )


class Admission:
    def __init__(
        self,
        counters: CounterStore,
        health: DatabaseHealth | None = None,
        book: WindowBook | None = None,
    ) -> None:
        self._counters = counters
        self._health = health if health is not None else DatabaseHealth()
        self._book = book  # None: every request counted in the database
        self._in_flight: dict[str, int] = {}
        self._reading: dict[str, asyncio.Future[None]] = {}  # subjects whose totals are read

    async def admit(self, principal: Principal, now: float) -> dict[str, str]:
        """Count the request in every window; 429 if over a limit or the concurrency cap,
        503 if the database is needed and unavailable."""
        counted = [(s, limits) for s, limits in principal.subjects if needs_counting(limits)]
        if not counted:
            return {}
        self._check_cap(principal, {})
        if self._book is None:
            return await self._admit_exact(principal, counted, now)
        return await self._admit_local(self._book, principal, counted, now)

    async def _admit_local(
        self, book: WindowBook, principal: Principal, counted: Counted, now: float
    ) -> dict[str, str]:
        """Decide in memory; read the subjects the book does not know first (one statement
        that adds nothing), so a new or restarted replica starts from the shared totals."""
        starts = window_starts(now)
        unknown = [subject for subject, _ in counted if not book.known(subject)]
        if unknown:
            await self._learn(book, unknown, starts, now)
        decision = decide([(limits, book.counts(s, starts)) for s, limits in counted], now)
        if not decision.allowed:
            raise _refused(decision)
        if unknown:  # the read was an await: another request may have taken the last slot
            self._check_cap(principal, decision.headers)
        for subject, _ in counted:
            book.add(subject, starts, now)
        return decision.headers

    async def _learn(
        self, book: WindowBook, unknown: list[str], starts: dict[Window, int], now: float
    ) -> None:
        """Read the shared totals of `unknown` subjects into the book, once per subject
        however many requests ask at once: after a start under load, every request of a
        busy user would otherwise read the same rows."""
        while unknown:
            mine = [s for s in unknown if s not in self._reading]
            if mine:
                await self._read(book, mine, starts, now)
            others = {self._reading[s] for s in unknown if s in self._reading}
            if others:  # wait() does not cancel them if this request is cancelled
                await asyncio.wait(others)
            # Subjects of a read that failed or was cancelled are still unknown: again.
            unknown = [s for s in unknown if s not in mine and not book.known(s)]

    async def _read(
        self, book: WindowBook, subjects: list[str], starts: dict[Window, int], now: float
    ) -> None:
        done = asyncio.get_running_loop().create_future()
        for subject in subjects:
            self._reading[subject] = done
        try:
            rows = [(s, w, starts[w], 0, 0) for s in subjects for w in WINDOWS]
            with self._health.guard("rate counters"):
                totals = await self._counters.bump(rows)
            book.install(totals, now)
        finally:
            for subject in subjects:
                del self._reading[subject]
            done.set_result(None)

    async def _admit_exact(
        self, principal: Principal, counted: Counted, now: float
    ) -> dict[str, str]:
        """Count the request in every window in the database (one statement), then decide."""
        starts = window_starts(now)
        rows = [(s, w, starts[w], 1, 0) for s, _ in counted for w in WINDOWS]
        with self._health.guard("rate counters"):
            totals = await self._counters.bump(rows)
        counts: dict[str, Counts] = {s: Counts() for s, _ in counted}
        for row in totals:
            window: Window = row.period  # type: ignore[assignment]
            counts[row.subject].requests[window] = row.requests
            counts[row.subject].tokens[window] = row.tokens
        decision = decide([(limits, counts[s]) for s, limits in counted], now)
        if decision.allowed:
            try:
                # Again: another request may have taken the last slot while this one was
                # counted. No await follows until the caller's acquire() takes the slot.
                self._check_cap(principal, decision.headers)
            except ApiError:
                await self._give_back(rows)
                raise
            return decision.headers
        await self._give_back(rows)
        raise _refused(decision)

    async def _give_back(self, rows: Sequence[Row]) -> None:
        """A refused request does not use up the budget. If the database fails now, the
        request stays counted (the safe side); the guard has logged the outage."""
        try:
            with self._health.guard("rate counters"):
                await self._counters.bump([(s, w, start, -1, 0) for s, w, start, _, _ in rows])
        except ApiError:  # DatabaseUnavailable, or a database error logged by the guard
            pass

    def _check_cap(self, principal: Principal, headers: dict[str, str]) -> None:
        for subject, limits in principal.subjects:
            if not concurrency_allows(self._in_flight.get(subject, 0), limits):
                raise ApiError(
                    429,
                    f"too many concurrent requests (at most {limits.concurrent})",
                    code="concurrency_limit_exceeded",
                    headers={**headers, "Retry-After": "1"},
                )

    def acquire(self, principal: Principal, headers: dict[str, str]) -> Callable[[], None]:
        """Take an in-flight slot of each capped subject; the result gives them back."""
        self._check_cap(principal, headers)
        capped = [s for s, limits in principal.subjects if limits.concurrent is not None]
        for subject in capped:
            self._in_flight[subject] = self._in_flight.get(subject, 0) + 1

        def release() -> None:
            for subject in capped:
                left = self._in_flight[subject] - 1
                if left:
                    self._in_flight[subject] = left
                else:
                    del self._in_flight[subject]

        return release

    @property
    def in_flight(self) -> dict[str, int]:
        return dict(self._in_flight)
