"""Budgets per group (issue 11): every user and key of a group share its request windows,
counted in the real counter store (SQLite), with the same headers and reset as a key's."""

from __future__ import annotations

from pathlib import Path

import pytest

from hub.auth import Principal
from hub.config import LimitsConfig, parse_config
from hub.errors import ApiError
from hub.usage.admission import Admission
from hub.usage.counters import CounterStore

BUDGET = LimitsConfig(requests_per_day=3, tokens_per_month=10_000)
NOON = 1_800_000_000.0 - 1_800_000_000.0 % 86400 + 43200  # a UTC noon


def member(user: str, group: str = "physics") -> Principal:
    return Principal(f"k-{user}", user, group, None, LimitsConfig(), LimitsConfig(), False, BUDGET)


def test_group_limits_are_configured_per_group() -> None:
    config = parse_config({"auth": {"group_limits": {"physics": {"requests_per_day": 3}}}})
    assert config.auth.group_limits["physics"].requests_per_day == 3
    assert ("group:physics", BUDGET) in member("ann").subjects
    assert all(not s.startswith("group:") for s, _ in member("bob", None).subjects)  # type: ignore[arg-type]


async def test_the_users_of_a_group_share_its_budget_until_the_window_ends(tmp_path: Path) -> None:
    store = await CounterStore.open(f"sqlite+aiosqlite:///{tmp_path / 'hub.db'}")
    try:
        await store._backend.fetch(  # the table the migrations create, reduced to its keys
            "CREATE TABLE rate_counters (subject TEXT, period TEXT, start INTEGER, "
            "requests INTEGER, tokens INTEGER, PRIMARY KEY (subject, period, start))",
            [],
        )
        admission = Admission(store)
        headers = await admission.admit(member("ann"), NOON)
        assert headers["X-RateLimit-Limit-Day"] == "3"
        assert headers["X-RateLimit-Remaining-Day"] == "2"
        await admission.admit(member("bob"), NOON + 1)
        await admission.admit(member("cid"), NOON + 2)
        with pytest.raises(ApiError) as refused:
            await admission.admit(member("dan"), NOON + 3)  # a fourth user: the group is out
        assert refused.value.status == 429
        assert refused.value.headers is not None
        assert refused.value.headers["Retry-After"] == str(43200 - 3)  # the day's end
        await admission.admit(member("eve", "chemistry"), NOON + 3)  # another group is not
        next_day = await admission.admit(member("dan"), NOON + 43200)
        assert next_day["X-RateLimit-Remaining-Day"] == "2"  # a new window
    finally:
        await store.aclose()
