"""Admission of one request: the per-replica in-flight cap, and shared rate-limit counters.

The cap is checked before the request is counted: a request the cap refuses does not use up
its request windows. Counting needs the database: while it is unavailable a request with
windowed limits gets 503 (its limits cannot be enforced honestly), not 500.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from hub.auth import Principal
from hub.counters import CounterStore, Row
from hub.db_health import DatabaseHealth
from hub.errors import ApiError
from hub.limits import (
    WINDOWS,
    Counts,
    Window,
    concurrency_allows,
    decide,
    needs_counting,
    window_starts,
)

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


class Admission:
    def __init__(self, counters: CounterStore, health: DatabaseHealth | None = None) -> None:
        self._counters = counters
        self._health = health if health is not None else DatabaseHealth()
        self._in_flight: dict[str, int] = {}

    async def admit(self, principal: Principal, now: float) -> dict[str, str]:
        """Count the request in every window (one statement); 429 if over a limit or the
        concurrency cap, 503 if the database is unavailable."""
        counted = [(s, limits) for s, limits in principal.subjects if needs_counting(limits)]
        if not counted:
            return {}
        self._check_cap(principal, {})
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
        raise ApiError(
            429,
            decision.reason or "rate limit reached",
            code="rate_limit_exceeded",
            headers=decision.headers,
        )

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
