"""Rate-limit decisions: pure functions of counts, limits and `now`.

Fixed windows aligned to UTC (minute, hour, day, calendar month) are counted in the
database, so that several hub replicas share one budget. Either every request is counted
there (`counter_sync_interval: 0`) or a replica counts in memory and shares its counts in
batches (`hub/usage/window_book.py`, `hub/usage/window_sync.py`): `local_counts` then says what a
request sees. Nothing in this module awaits, reads a clock or touches storage.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from hub.config import LimitsConfig

Window = Literal["minute", "hour", "day", "month"]
WINDOWS: tuple[Window, ...] = ("minute", "hour", "day", "month")
TOKEN_WINDOWS: tuple[Window, ...] = ("day", "month")
_SECONDS = {"minute": 60, "hour": 3600, "day": 86400}
_REQUEST_FIELDS = {window: f"requests_per_{window}" for window in WINDOWS}
_TOKEN_FIELDS = {window: f"tokens_per_{window}" for window in TOKEN_WINDOWS}


def window_bounds(window: Window, now: float) -> tuple[int, int]:
    """Start and end (epoch seconds, UTC) of the window containing `now`."""
    if window != "month":
        size = _SECONDS[window]
        start = int(now // size) * size
        return start, start + size
    return _month_of_day(int(now // 86400))


@functools.lru_cache(maxsize=8)
def _month_of_day(day: int) -> tuple[int, int]:
    """Start and end of the calendar month (UTC) containing day number `day` since 1970."""
    moment = datetime.fromtimestamp(day * 86400, UTC)
    first = datetime(moment.year, moment.month, 1, tzinfo=UTC)
    year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
    return int(first.timestamp()), int(datetime(year, month, 1, tzinfo=UTC).timestamp())


def window_starts(now: float) -> dict[Window, int]:
    """The start of every window containing `now`."""
    return {window: window_bounds(window, now)[0] for window in WINDOWS}


def request_limit(limits: LimitsConfig, window: Window) -> int | None:
    value: int | None = getattr(limits, _REQUEST_FIELDS[window])
    return value


def token_limit(limits: LimitsConfig, window: Window) -> int | None:
    field_name = _TOKEN_FIELDS.get(window)
    if field_name is None:
        return None
    value: int | None = getattr(limits, field_name)
    return value


def needs_counting(limits: LimitsConfig) -> bool:
    """Whether a subject with these limits needs the counters at all."""
    return any(request_limit(limits, w) is not None for w in WINDOWS) or any(
        token_limit(limits, w) is not None for w in TOKEN_WINDOWS
    )


@dataclass(frozen=True)
class Counts:
    """One subject's counters: requests including this one, tokens used before it."""

    requests: dict[Window, int] = field(default_factory=dict)
    tokens: dict[Window, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Shared:
    """One window of one subject as the database last returned it: every replica's synced
    requests (this one's included) and the tokens the usage writers added."""

    start: int
    requests: int
    tokens: int


def local_counts(
    shared: Mapping[Window, Shared], unsynced: Mapping[Window, int], starts: Mapping[Window, int]
) -> Counts:
    """A subject's counts for a request decided in memory: the last shared totals of the
    current windows, plus this replica's requests not in them yet, plus this request.

    A window that began after the last shared totals were read starts from nothing: no
    replica could count in it before it began."""
    requests: dict[Window, int] = {}
    tokens: dict[Window, int] = {}
    for window, start in starts.items():
        known = shared.get(window)
        if known is None or known.start != start:
            known = Shared(start, 0, 0)
        requests[window] = known.requests + unsynced.get(window, 0) + 1
        tokens[window] = known.tokens
    return Counts(requests, tokens)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    headers: dict[str, str]
    retry_after: int | None = None
    reason: str | None = None


def _seconds_left(window: Window, now: float) -> int:
    return max(1, math.ceil(window_bounds(window, now)[1] - now))


def _blocked(limits: LimitsConfig, counts: Counts) -> list[tuple[Window, str]]:
    blocked: list[tuple[Window, str]] = []
    for window in WINDOWS:
        limit = request_limit(limits, window)
        if limit is not None and counts.requests.get(window, 0) > limit:
            blocked.append((window, f"{limit} requests per {window}"))
        tokens = token_limit(limits, window)
        if tokens is not None and counts.tokens.get(window, 0) >= tokens:
            blocked.append((window, f"{tokens} tokens per {window}"))
    return blocked


def _headers(checks: Sequence[tuple[LimitsConfig, Counts]], now: float) -> dict[str, str]:
    headers: dict[str, str] = {}
    tightest: tuple[float, int, Window] | None = None
    for rank, window in enumerate(WINDOWS):
        pairs = [
            (limit, counts.requests.get(window, 0))
            for limits, counts in checks
            if (limit := request_limit(limits, window)) is not None
        ]
        if not pairs:
            continue
        limit = min(limit for limit, _ in pairs)
        remaining = min(max(0, limit - used) for limit, used in pairs)
        name = window.capitalize()
        headers[f"X-RateLimit-Limit-{name}"] = str(limit)
        headers[f"X-RateLimit-Remaining-{name}"] = str(remaining)
        share = remaining / limit if limit else 0.0
        if tightest is None or (share, rank) < tightest[:2]:
            tightest = (share, rank, window)
    if tightest is not None:
        headers["RateLimit-Reset"] = str(_seconds_left(tightest[2], now))
    return headers


def decide(checks: Sequence[tuple[LimitsConfig, Counts]], now: float) -> Decision:
    """Allow or deny one request given each subject's limits and counts (key, user...)."""
    headers = _headers(checks, now)
    blocked = [item for limits, counts in checks for item in _blocked(limits, counts)]
    if not blocked:
        return Decision(True, headers)
    retry_after = max(_seconds_left(window, now) for window, _ in blocked)
    headers["Retry-After"] = str(retry_after)
    headers["RateLimit-Reset"] = str(retry_after)
    reason = "rate limit reached: " + ", ".join(sorted({text for _, text in blocked}))
    return Decision(False, headers, retry_after, reason)


def concurrency_allows(in_flight: int, limits: LimitsConfig) -> bool:
    """Whether one more in-flight request fits under the cap (in_flight excludes it)."""
    return limits.concurrent is None or in_flight < limits.concurrent
