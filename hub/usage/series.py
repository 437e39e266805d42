"""Usage over time from the usage rows, for the charts of the account page and the dashboard.

Rows are counted per time bucket (an hour or a UTC day) and per model, group or user, in
the database: a month of traffic is a few hundred result rows, whatever the request count.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from sqlalchemy import BigInteger, Integer, case, cast, func, select
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.elements import ColumnElement

from hub.storage import usage

SeriesBy = Literal["model", "group", "user"]
Bucket = Literal["hour", "day"]
BUCKET_SECONDS = {"hour": 3600, "day": 86400}
QUERY_TIMEOUT = 15.0  # seconds for one usage query
MAX_BUCKETS = 24 * 92  # hours in three months: a chart larger than that is no use
_COLUMNS = {"model": usage.c.model, "group": usage.c.group_name, "user": usage.c.user_name}


def _bucket_start(dialect: str, seconds: int) -> ColumnElement[Any]:
    """The start of each row's bucket, in epoch seconds (UTC days: epoch days are UTC)."""
    if dialect == "sqlite":  # no floor(); a cast truncates, which is floor for positives
        index: ColumnElement[Any] = cast(usage.c.started_at / seconds, Integer)
    else:  # PostgreSQL's cast rounds: floor first
        index = cast(func.floor(usage.c.started_at / seconds), BigInteger)
    return index * seconds


def _totals() -> list[ColumnElement[Any]]:
    return [
        func.count().label("requests"),
        func.coalesce(func.sum(usage.c.prompt_tokens + usage.c.completion_tokens), 0).label(
            "tokens"
        ),
        func.sum(case((usage.c.status >= 400, 1), else_=0)).label("errors"),
    ]


async def usage_series(
    engine: AsyncEngine,
    *,
    since: float,
    until: float,
    by: SeriesBy,
    bucket: Bucket,
    user: str | None = None,
) -> list[dict[str, Any]]:
    """[{start, <by>, requests, tokens, errors}] per bucket and value of `by`, oldest first;
    only the rows of `user` when given."""
    seconds = BUCKET_SECONDS[bucket]
    if (until - since) / seconds > MAX_BUCKETS:
        raise ValueError(f"at most {MAX_BUCKETS} buckets: choose a shorter range or days")
    start = _bucket_start(engine.dialect.name, seconds).label("start")
    column = _COLUMNS[by]
    statement = (
        select(start, column.label(by), *_totals())
        .where(usage.c.started_at >= since, usage.c.started_at < until)
        .group_by(start, column)
        .order_by(start, column)
    )
    if user is not None:
        statement = statement.where(usage.c.user_name == user)
    async with asyncio.timeout(QUERY_TIMEOUT), engine.connect() as connection:
        rows = (await connection.execute(statement)).all()
    return [{**row._asdict(), "start": int(row.start), "tokens": int(row.tokens)} for row in rows]


async def user_totals(
    engine: AsyncEngine, user: str, since: float, until: float
) -> dict[str, dict[str, int]]:
    """Requests, tokens and errors of one user in a range, per model."""
    statement = (
        select(usage.c.model, *_totals())
        .where(usage.c.user_name == user, usage.c.started_at >= since, usage.c.started_at < until)
        .group_by(usage.c.model)
    )
    async with asyncio.timeout(QUERY_TIMEOUT), engine.connect() as connection:
        rows = (await connection.execute(statement)).all()
    return {
        row.model: {"requests": row.requests, "tokens": int(row.tokens), "errors": row.errors}
        for row in rows
    }
