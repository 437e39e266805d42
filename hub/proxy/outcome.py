"""What is known about a proxied request when it ends, and its recording (usage, metrics)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from hub.auth import Principal
from hub.proxy.sse import Usage, UsageWish
from hub.services import HubServices
from hub.usage.accounting import UsageRecord

CLIENT_GONE = 499


@dataclass
class Outcome:
    """What is known about a request when it ends; filled in as it runs."""

    endpoint: str
    model: str
    upstream: str
    principal: Principal
    stream: bool
    started_at: float
    started: float  # perf_counter
    request_id: str
    target: str  # the upstream's name for the model
    usage_wish: UsageWish = "none"  # what usage the client asked to see in a stream
    status: int = CLIENT_GONE
    usage: Usage | None = None
    first_chunk: float | None = None


def finish(services: HubServices, outcome: Outcome) -> None:
    """Record usage and metrics of a finished request (never awaits)."""
    now = time.perf_counter()
    usage = outcome.usage or Usage(0, 0)
    ttft = outcome.first_chunk - outcome.started if outcome.first_chunk else None
    principal = outcome.principal
    services.metrics.observe(
        model=outcome.model,
        upstream=outcome.upstream,
        endpoint=outcome.endpoint,
        status=outcome.status,
        seconds=now - outcome.started,
        ttft=ttft,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
    )
    record = UsageRecord(
        request_id=outcome.request_id,
        key_id=principal.key_id,
        user_name=principal.user,
        group_name=principal.group,
        model=outcome.model,
        upstream=outcome.upstream,
        endpoint=outcome.endpoint,
        status=outcome.status,
        stream=outcome.stream,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        latency_ms=(now - outcome.started) * 1000,
        ttft_ms=ttft * 1000 if ttft else None,
        started_at=outcome.started_at,
        finished_at=outcome.started_at + (now - outcome.started),
    )
    subjects = tuple(subject for subject, _ in principal.subjects)
    services.recorder.record(record, subjects)
