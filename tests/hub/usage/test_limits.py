"""Rate-limit decisions: pure functions, no mocks."""

from __future__ import annotations

from datetime import UTC, datetime

from hub.config import LimitsConfig
from hub.usage.limits import Counts, concurrency_allows, decide, needs_counting, window_bounds

NOW = datetime(2026, 12, 31, 23, 59, 30, tzinfo=UTC).timestamp()


def test_window_bounds_are_utc_aligned_including_month_and_year_end() -> None:
    assert window_bounds("minute", NOW) == (int(NOW) - 30, int(NOW) + 30)
    start, end = window_bounds("month", NOW)
    assert datetime.fromtimestamp(start, UTC) == datetime(2026, 12, 1, tzinfo=UTC)
    assert datetime.fromtimestamp(end, UTC) == datetime(2027, 1, 1, tzinfo=UTC)
    day_start, day_end = window_bounds("day", NOW)
    assert day_end - day_start == 86400 and day_end == end


def test_allowed_request_reports_headers_of_configured_windows() -> None:
    limits = LimitsConfig(requests_per_minute=10, requests_per_day=100)
    decision = decide([(limits, Counts(requests={"minute": 3, "day": 90}))], NOW)
    assert decision.allowed
    assert decision.headers["X-RateLimit-Limit-Minute"] == "10"
    assert decision.headers["X-RateLimit-Remaining-Minute"] == "7"
    assert decision.headers["X-RateLimit-Remaining-Day"] == "10"
    assert "X-RateLimit-Limit-Hour" not in decision.headers
    # The day window is the tighter one (10% left) and resets in 30 s, like the minute.
    assert decision.headers["RateLimit-Reset"] == "30"


def test_over_the_limit_is_denied_with_retry_after_of_the_blocking_window() -> None:
    limits = LimitsConfig(requests_per_minute=10, requests_per_hour=20)
    counts = Counts(requests={"minute": 5, "hour": 21})
    decision = decide([(limits, counts)], NOW)
    assert not decision.allowed
    assert decision.retry_after == 30  # the hour ends with the minute here
    assert decision.headers["Retry-After"] == "30"
    assert decision.reason is not None and "20 requests per hour" in decision.reason
    assert decision.headers["X-RateLimit-Remaining-Hour"] == "0"


def test_exactly_at_the_limit_is_allowed() -> None:
    limits = LimitsConfig(requests_per_minute=2)
    assert decide([(limits, Counts(requests={"minute": 2}))], NOW).allowed
    assert not decide([(limits, Counts(requests={"minute": 3}))], NOW).allowed


def test_token_budget_denies_once_used_up() -> None:
    limits = LimitsConfig(tokens_per_month=1000)
    assert decide([(limits, Counts(tokens={"month": 999}))], NOW).allowed
    denied = decide([(limits, Counts(tokens={"month": 1000}))], NOW)
    assert not denied.allowed and denied.reason is not None and "tokens per month" in denied.reason


def test_key_and_user_limits_combine_to_the_tightest() -> None:
    key = LimitsConfig(requests_per_minute=100)
    user = LimitsConfig(requests_per_minute=5)
    decision = decide(
        [(key, Counts(requests={"minute": 6})), (user, Counts(requests={"minute": 6}))], NOW
    )
    assert not decision.allowed
    assert decision.headers["X-RateLimit-Limit-Minute"] == "5"
    assert decision.headers["X-RateLimit-Remaining-Minute"] == "0"


def test_unlimited_needs_no_counting_and_no_headers() -> None:
    assert not needs_counting(LimitsConfig(concurrent=3))
    assert needs_counting(LimitsConfig(tokens_per_day=1))
    assert decide([], NOW).headers == {}


def test_concurrency() -> None:
    assert concurrency_allows(1, LimitsConfig(concurrent=2))
    assert not concurrency_allows(2, LimitsConfig(concurrent=2))
    assert concurrency_allows(10_000, LimitsConfig())
