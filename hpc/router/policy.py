"""Pure routing decisions: which backend takes a request, and how a service is described.

No awaits, clocks or I/O: the router passes a snapshot in and acts on the answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

Status = Literal["ready", "loading", "offline"]


RETRY_BASE = 0.25  # back-off after a backend's first failure, doubled per failure in a row
RETRY_MAX = 4.0


class Candidate(Protocol):
    @property
    def job_id(self) -> str: ...

    @property
    def in_flight(self) -> int: ...

    @property
    def failures(self) -> int: ...

    @property
    def retry_at(self) -> float: ...


def pick_backend(candidates: Sequence[Candidate], turn: int, now: float) -> str | None:
    """Least outstanding requests; ties go round-robin by `turn` (the router's counter).

    A backend that failed before answering is skipped until its `retry_at`; the router
    moves `retry_at` on when it sends one a request, so it gets one trial at a time.
    Returns the chosen job id, or None when no candidate can take a request now.
    """
    least = 0
    tied: list[str] = []
    for candidate in candidates:  # one pass: this runs for every request
        if candidate.failures and candidate.retry_at > now:
            continue
        load = candidate.in_flight
        if not tied or load < least:
            least, tied = load, [candidate.job_id]
        elif load == least:
            tied.append(candidate.job_id)
    if len(tied) > 1:
        tied.sort()
    return tied[turn % len(tied)] if tied else None


def retry_delay(failures: int) -> float:
    """How long a backend with `failures` failed attempts in a row takes no request."""
    return min(RETRY_BASE * (1 << min(max(failures - 1, 0), 16)), RETRY_MAX)


def next_trial(candidates: Sequence[Candidate], now: float) -> float | None:
    """When the earliest backend now skipped may be tried again (None: none is skipped)."""
    times = [c.retry_at for c in candidates if c.failures and c.retry_at > now]
    return min(times, default=None)


@dataclass(frozen=True)
class ServiceCounts:
    """The router's counts of one service (not the scheduler's `policy.ServiceSnapshot`)."""

    ready: int  # backends taking new requests
    starting: int  # jobs pending or starting
    in_flight: int
    queued: int  # requests waiting for a ready backend
    demand_waiting: bool  # a request found no backend and the scheduler was woken
    target_concurrency: int


def service_status(counts: ServiceCounts) -> Status:
    if counts.ready > 0:
        return "ready"
    if counts.starting > 0 or counts.queued > 0 or counts.demand_waiting:
        return "loading"
    return "offline"


def service_demand(counts: ServiceCounts) -> float:
    """Load level: outstanding requests per unit of ready capacity (>1: more than it takes)."""
    capacity = max(counts.ready, 1) * counts.target_concurrency
    return round((counts.in_flight + counts.queued) / capacity, 3)


def queue_is_full(queued: int, max_queue: int) -> bool:
    return queued >= max_queue


def has_free_slot(candidate: Candidate, limit: int, now: float) -> bool:
    """Whether a backend may take one more request now: under its concurrency target,
    and not waiting out a failure's back-off."""
    if candidate.failures and candidate.retry_at > now:
        return False
    return candidate.in_flight < limit


def gauge_cap(cap: int | None, running: int, waiting: int) -> int | None:
    """A backend's concurrency cap after one reading of its own gauges (vLLM's running and
    waiting requests); None: no cap beyond the service's `target_concurrency`.

    When the backend's own queue holds requests, the cap becomes what it ran at once: more
    would wait inside its FIFO, where fair queueing does not apply. When it ran all it was
    given with nothing waiting, the cap grows by one to find its capacity again.
    """
    if waiting > 0 and running >= 1:
        return running
    if cap is not None and waiting <= 0 and running >= cap:
        return cap + 1
    return cap


def slot_limit(target: int, cap: int | None) -> int:
    """How many requests the router sends a backend at once."""
    return target if cap is None else max(1, min(target, cap))


def expected_wait(queued: int, dispatches: Sequence[float], now: float) -> float:
    """Seconds until `queued` more requests are dispatched at the recent rate (the times of
    the last dispatches); with no recent dispatch, the span they cover is unknown: 0."""
    recent = [t for t in dispatches if now - t <= 60.0]
    if len(recent) < 2 or queued <= 0:
        return 0.0
    span = max(now - recent[0], 1e-3)
    return queued * span / len(recent)
