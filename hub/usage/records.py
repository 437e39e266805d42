"""One request's usage record, made storable, and the usage writer's retry schedule (pure)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import String

from hub.storage import usage

log = logging.getLogger(__name__)

MAX_COUNT = 2**31 - 1  # the token columns are 32-bit integers on PostgreSQL
MAX_BACKOFF = 5.0  # seconds between write attempts at most: an outage's end is seen quickly
_COUNTS = ("prompt_tokens", "completion_tokens")
_TEXTS = {
    column.name: column.type.length
    for column in usage.columns
    if isinstance(column.type, String) and column.type.length
}


@dataclass(frozen=True)
class UsageRecord:
    request_id: str
    key_id: str | None
    user_name: str | None
    group_name: str | None
    model: str
    upstream: str
    endpoint: str
    status: int
    stream: bool
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    ttft_ms: float | None
    started_at: float
    finished_at: float


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    number = int(value) if math.isfinite(value) else 0
    return min(max(number, 0), MAX_COUNT)


def sanitized(record: UsageRecord) -> UsageRecord:
    """The record as every database stores it: token counts clamped to 0..2**31-1, texts
    cut to their column's length. A broken or hostile upstream (usage 2**64) or proxy
    header must not give the writer a row the database refuses."""
    changes: dict[str, Any] = {}
    for name in _COUNTS:
        value = getattr(record, name)
        if type(value) is not int or not 0 <= value <= MAX_COUNT:
            changes[name] = _count(value)
    for name, length in _TEXTS.items():
        text = getattr(record, name)
        if text is not None and len(text) > length:
            changes[name] = text[:length]
    if not changes:
        return record
    log.warning(
        "usage record %s: %s out of range, stored clamped",
        record.request_id[:64], ", ".join(sorted(changes)),
    )  # fmt: skip
    return replace(record, **changes)


def retry_delay(failures: int, interval: float) -> float:
    """Seconds before the next write after `failures` failed attempts in a row: the flush
    interval, doubling while failing, at most MAX_BACKOFF (or the interval if longer)."""
    if failures <= 0:
        return interval
    growing: float = interval * 2 ** min(failures - 1, 16)
    return min(growing, max(interval, MAX_BACKOFF))
