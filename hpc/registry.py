"""The agent's live view of backends, shared by the scheduler (writer) and router (reader).

The scheduler publishes which backends are ready or draining after each observation; the
router takes a backend for each request and reports load back. Everything here runs on the
agent's one event loop, so no locks are needed.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

RATE_WINDOW = 60.0


@dataclass
class Backend:
    service: str
    job_id: str
    url: str
    api_key: str | None = None
    certificate: str | None = None  # the job's own TLS certificate (PEM): pinned, https
    draining: bool = False
    in_flight: int = 0
    served: int = 0  # answers it completed (failed attempts and broken streams not counted)
    failures: int = 0  # attempts in a row that failed before any response byte
    retry_at: float = 0.0  # after a failure: monotonic time before which it takes no request
    # The backend's own gauges as published (vLLM's /metrics; None: not known), a count of
    # publications with gauges, and the router's concurrency cap derived from them.
    running: int | None = None
    waiting: int | None = None
    readings: int = 0
    cap: int | None = None
    capped_at: int = 0  # the reading `cap` was last derived from


class QueueView(Protocol):
    """What the registry reads of a service's waiting requests (the router's queue)."""

    def __len__(self) -> int: ...

    def oldest_arrival(self) -> float | None: ...


@dataclass(frozen=True)
class ServiceLoad:
    in_flight: int
    queued: int
    rate_per_s: float


@dataclass
class _ServiceState:
    backends: dict[str, Backend] = field(default_factory=dict)
    # Set (and replaced) whenever the routable backends change: waiting requests look again.
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    queued: int = 0
    arrivals: deque[float] = field(default_factory=deque)
    demand_since: float | None = None
    starting: int = 0
    # The scheduler's predicted wait until a first instance serves (None: unknown), and the
    # router's monotonic time it was published at: it shrinks as time passes.
    predicted_wait: float | None = None
    predicted_at: float = 0.0
    queue: QueueView | None = None
    listeners: list[Callable[[], None]] = field(default_factory=list)


class BackendRegistry:
    def __init__(self) -> None:
        self._services: dict[str, _ServiceState] = {}
        self.wakeup = asyncio.Event()

    def _state(self, service: str) -> _ServiceState:
        # Not setdefault: that would build (and drop) a state with an Event per request.
        state = self._services.get(service)
        if state is None:
            state = self._services[service] = _ServiceState()
        return state

    # -- scheduler side -------------------------------------------------------------
    def publish(self, service: str, backends: list[Backend], starting: int = 0) -> None:
        """Replace the service's backends, keeping the router's counters of known jobs.

        `starting` counts the service's jobs that are pending or not yet healthy: the router
        reports the service as `loading` meanwhile.
        """
        state = self._state(service)
        state.starting = starting
        before = _routable(state.backends)
        fresh: dict[str, Backend] = {}
        for backend in backends:
            old = state.backends.get(backend.job_id)
            if old is not None:
                old.url, old.api_key, old.draining = backend.url, backend.api_key, backend.draining
                old.certificate = backend.certificate
                _take_gauges(old, backend)
                fresh[backend.job_id] = old
            else:
                backend.readings += backend.running is not None  # its first reading
                fresh[backend.job_id] = backend
        for job_id, old in state.backends.items():
            if job_id not in fresh and old.in_flight > 0:
                # Unpublished (unhealthy, cancelled) with requests still open: it takes no new
                # ones, but its load stays counted until they end (the scheduler waits on it).
                old.draining = True
                fresh[job_id] = old
        state.backends = fresh
        if any(not b.draining for b in fresh.values()):
            state.demand_since = None
        if _routable(fresh) != before:
            _notify(state)
        else:  # caps may have grown: waiting requests may go now
            _call(state)

    def publish_wait(self, service: str, seconds: float | None, now: float) -> None:
        """The scheduler's predicted wait for the service's first instance, as of `now`
        (monotonic); None when it has no estimate."""
        state = self._state(service)
        state.predicted_wait, state.predicted_at = seconds, now

    def in_flight_of(self, service: str, job_id: str) -> int:
        backend = self._state(service).backends.get(job_id)
        return backend.in_flight if backend else 0

    def load(self, service: str, now: float) -> ServiceLoad:
        state = self._state(service)
        while state.arrivals and state.arrivals[0] < now - RATE_WINDOW:
            state.arrivals.popleft()
        return ServiceLoad(
            in_flight=sum(b.in_flight for b in state.backends.values()),
            queued=self.queued(service),  # the router's queue too: demand that scales up
            rate_per_s=len(state.arrivals) / RATE_WINDOW,
        )

    def demand_since(self, service: str) -> float | None:
        """When a request first found no ready backend (scale from zero), else None."""
        return self._state(service).demand_since

    # -- router side ----------------------------------------------------------------
    def ready(self, service: str) -> list[Backend]:
        return [b for b in self._state(service).backends.values() if not b.draining]

    def note_arrival(self, service: str, now: float) -> None:
        self._state(service).arrivals.append(now)

    def note_demand(self, service: str, now: float) -> None:
        """A request waits with no ready backend: wake the scheduler to start one."""
        state = self._state(service)
        if state.demand_since is None:
            state.demand_since = now
        self.wakeup.set()

    def note_failure(self, backend: Backend, retry_at: float) -> None:
        """An attempt failed before any response byte: no request until `retry_at`.

        The first failure in a row also wakes the scheduler to look at the job now.
        """
        backend.failures += 1
        backend.retry_at = retry_at
        if backend.failures == 1:
            self.wakeup.set()
        _notify(self._state(backend.service))

    def note_answered(self, backend: Backend) -> None:
        """The backend sent a response head: it takes requests again."""
        if backend.failures:
            backend.failures, backend.retry_at = 0, 0.0
            _notify(self._state(backend.service))

    async def wait_change(self, service: str) -> None:
        """Return once the service's backends change (published, failed or answering again);
        the caller counts as queued meanwhile and applies the timeout."""
        state = self._state(service)
        changed = state.changed
        state.queued += 1
        try:
            await changed.wait()
        finally:
            state.queued -= 1

    async def wait_ready(self, service: str) -> None:
        """Return once the service has a ready backend; the caller applies the timeout."""
        while not self.ready(service):
            await self.wait_change(service)

    def queued(self, service: str) -> int:
        """Requests waiting: in the router's queue, or for the backends to change."""
        state = self._state(service)
        return state.queued + (len(state.queue) if state.queue is not None else 0)

    def oldest_wait(self, service: str, now: float) -> float:
        """Seconds the longest-waiting request of the service's queue has waited."""
        queue = self._state(service).queue
        oldest = queue.oldest_arrival() if queue is not None else None
        return 0.0 if oldest is None else max(0.0, now - oldest)

    def attach_queue(self, service: str, queue: QueueView, listener: Callable[[], None]) -> None:
        """The router's queue of `service`; `listener` runs (synchronously, no await) after
        every change of the service's backends, so waiting requests are dispatched."""
        state = self._state(service)
        state.queue = queue
        state.listeners.append(listener)

    def predicted_wait(self, service: str, now: float) -> float | None:
        """Seconds until the service should serve, as last published, less the time since."""
        state = self._state(service)
        if state.predicted_wait is None:
            return None
        return max(0.0, state.predicted_wait - (now - state.predicted_at))

    def starting(self, service: str) -> int:
        """Jobs of the service pending or starting, as last published."""
        return self._state(service).starting


def _routable(backends: dict[str, Backend]) -> list[tuple[str, str]]:
    return [(b.job_id, b.url) for b in backends.values() if not b.draining]


def _notify(state: _ServiceState) -> None:
    """Wake every request waiting on the service; later waiters get a fresh event."""
    state.changed.set()
    state.changed = asyncio.Event()
    _call(state)


def _call(state: _ServiceState) -> None:
    for listener in state.listeners:
        listener()


def _take_gauges(old: Backend, new: Backend) -> None:
    """Keep the backend's latest gauges; the router derives its cap from each reading."""
    if new.running is not None and new.waiting is not None:
        old.running, old.waiting = new.running, new.waiting
        old.readings += 1
