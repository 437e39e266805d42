"""Admission of one request: shared rate-limit counters, then the per-replica in-flight cap."""

from __future__ import annotations

from collections.abc import Callable

from hub.auth import Principal
from hub.counters import CounterStore
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


class Admission:
    def __init__(self, counters: CounterStore) -> None:
        self._counters = counters
        self._in_flight: dict[str, int] = {}

    async def admit(self, principal: Principal, now: float) -> dict[str, str]:
        """Count the request in every window (one statement); 429 if over a limit."""
        counted = [(s, limits) for s, limits in principal.subjects if needs_counting(limits)]
        if not counted:
            return {}
        starts = window_starts(now)
        rows = [(s, w, starts[w], 1, 0) for s, _ in counted for w in WINDOWS]
        totals = await self._counters.bump(rows)
        counts: dict[str, Counts] = {s: Counts() for s, _ in counted}
        for row in totals:
            window: Window = row.period  # type: ignore[assignment]
            counts[row.subject].requests[window] = row.requests
            counts[row.subject].tokens[window] = row.tokens
        decision = decide([(limits, counts[s]) for s, limits in counted], now)
        if decision.allowed:
            return decision.headers
        # A refused request does not use up the budget.
        await self._counters.bump([(s, w, start, -1, 0) for s, w, start, _, _ in rows])
        raise ApiError(
            429,
            decision.reason or "rate limit reached",
            code="rate_limit_exceeded",
            headers=decision.headers,
        )

    def acquire(self, principal: Principal, headers: dict[str, str]) -> Callable[[], None]:
        """Take an in-flight slot of each capped subject; the result gives them back."""
        capped = [(s, lim) for s, lim in principal.subjects if lim.concurrent is not None]
        for subject, limits in capped:
            if not concurrency_allows(self._in_flight.get(subject, 0), limits):
                raise ApiError(
                    429,
                    f"too many concurrent requests (at most {limits.concurrent})",
                    code="concurrency_limit_exceeded",
                    headers={**headers, "Retry-After": "1"},
                )
        for subject, _ in capped:
            self._in_flight[subject] = self._in_flight.get(subject, 0) + 1

        def release() -> None:
            for subject, _ in capped:
                left = self._in_flight[subject] - 1
                if left:
                    self._in_flight[subject] = left
                else:
                    del self._in_flight[subject]

        return release

    @property
    def in_flight(self) -> dict[str, int]:
        return dict(self._in_flight)
