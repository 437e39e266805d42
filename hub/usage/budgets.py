"""Each group's use of its current windows next to its budget (`auth.group_limits`), for
`saia hub usage --by group` and `GET /admin/usage/groups`.

The use is what the rate counters in the database hold: every replica's requests up to its
last sync (`counter_sync_interval`), and the tokens of the usage already written.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.ext.asyncio import AsyncEngine

from hub.config import LimitsConfig
from hub.storage import rate_counters
from hub.usage.limits import TOKEN_WINDOWS, WINDOWS, request_limit, token_limit, window_bounds

Use = Mapping[tuple[str, str], tuple[int, int]]  # (group, window) -> (requests, tokens)
COLUMNS = (
    "group", "window", "requests", "requests_limit", "tokens", "tokens_limit", "resets_at",
)  # fmt: skip


def budget_rows(budgets: Mapping[str, LimitsConfig], use: Use, now: float) -> list[dict[str, Any]]:
    """One row per group and window that the group's budget limits: its use in the window
    containing `now`, the limits, and when the window ends (epoch seconds). Pure."""
    rows = []
    for group in sorted(budgets):
        limits = budgets[group]
        for window in WINDOWS:
            requests_limit = request_limit(limits, window)
            tokens_limit = token_limit(limits, window)
            if requests_limit is None and tokens_limit is None:
                continue
            requests, tokens = use.get((group, window), (0, 0))
            rows.append({
                "group": group,
                "window": window,
                "requests": requests,
                "requests_limit": requests_limit,
                "tokens": tokens if window in TOKEN_WINDOWS else None,
                "tokens_limit": tokens_limit,
                "resets_at": window_bounds(window, now)[1],
            })  # fmt: skip
    return rows


async def group_use(engine: AsyncEngine, groups: Iterable[str], now: float) -> Use:
    """The counters of the windows containing `now` of these groups (missing: unused)."""
    subjects = {f"group:{group}": group for group in groups}
    if not subjects:
        return {}
    column = rate_counters.c
    current = [
        and_(column.period == window, column.start == window_bounds(window, now)[0])
        for window in WINDOWS
    ]
    statement = select(column.subject, column.period, column.requests, column.tokens).where(
        column.subject.in_(list(subjects)), or_(*current)
    )
    async with engine.connect() as connection:
        result = await connection.execute(statement)
        return {
            (subjects[row.subject], row.period): (int(row.requests), int(row.tokens))
            for row in result.all()
        }


async def group_budgets(
    engine: AsyncEngine, budgets: Mapping[str, LimitsConfig], now: float
) -> list[dict[str, Any]]:
    return budget_rows(budgets, await group_use(engine, budgets, now), now)
