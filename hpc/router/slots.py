"""One service's backend slots and the requests waiting for them, in fair order.

Requests wait here, in the router, where fair queueing applies (`hpc.router.fair_queue`),
not inside a backend's own FIFO: each backend takes at most its slot limit at once (the
service's `target_concurrency`, lowered by the backend's own running/waiting gauges,
`hpc.router.policy.slot_limit`). Whenever a slot may have become free (a request ended, a
backend was published, failed or answered again, a request arrived) `dispatch()` hands free
slots to waiting requests in the queue's order. It runs synchronously, so no slot is given
twice. A waiting request that is cancelled or times out leaves the queue; one that was given
a slot just before it was cancelled gives the slot back.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from hpc.registry import Backend, BackendRegistry
from hpc.router.fair_queue import FairQueue, Ticket
from hpc.router.policy import (
    expected_wait,
    gauge_cap,
    has_free_slot,
    next_trial,
    pick_backend,
    retry_delay,
    slot_limit,
)

DISPATCH_HISTORY = 64  # recent dispatch times kept for the expected wait


class Waiter:
    __slots__ = ("future", "ticket")

    def __init__(self, future: asyncio.Future[Backend], ticket: Ticket) -> None:
        self.future, self.ticket = future, ticket


class ServiceSlots:
    """Owned by the Forwarder, one per service; everything runs on the agent's loop."""

    def __init__(
        self,
        name: str,
        registry: BackendRegistry,
        queue: FairQueue[Waiter],
        target: Callable[[], int],
    ) -> None:
        self.name = name
        self.queue = queue
        self._registry = registry
        self._target = target  # the service's target_concurrency (a reload may change it)
        self._turn = 0
        self.dispatched: deque[float] = deque(maxlen=DISPATCH_HISTORY)
        registry.attach_queue(name, queue, self.dispatch)

    async def acquire(self, ticket: Ticket, deadline: float) -> Backend | None:
        """A backend slot for this request, waiting in fair order until `deadline`;
        None if the deadline passed first. The caller must `release()` the backend."""
        if not len(self.queue):  # the usual case: nobody waits, so a free slot is ours
            backend = self._take(time.monotonic())
            if backend is not None:
                self.queue.pass_through(ticket)
                return backend
        waiter = Waiter(asyncio.get_running_loop().create_future(), ticket)
        self.queue.push(waiter, ticket)
        granted = False
        try:
            while True:
                self.dispatch()
                if waiter.future.done():
                    granted = True
                    return waiter.future.result()
                now = time.monotonic()
                if now >= deadline:
                    return None
                ready = self._registry.ready(self.name)
                if not ready:
                    self._registry.note_demand(self.name, now)  # start one (scale from zero)
                wake = min(deadline, next_trial(ready, now) or deadline)
                # wait() does not cancel the future when it times out or is cancelled.
                await asyncio.wait([waiter.future], timeout=wake - now)
        finally:
            if not waiter.future.done():
                waiter.future.cancel()
                self.queue.remove(waiter)
            elif not granted:  # given a slot, then cancelled before taking it
                self.release(waiter.future.result())

    def release(self, backend: Backend) -> None:
        """The request on `backend` ended: its slot goes to the next waiting request."""
        backend.in_flight -= 1
        self.dispatch()

    def dispatch(self) -> None:
        """Give free backend slots to waiting requests, in the queue's order."""
        if not len(self.queue):
            return
        now = time.monotonic()
        while len(self.queue):
            backend = self._take(now)
            if backend is None:
                return
            waiter = self.queue.pop()
            assert waiter is not None
            waiter.future.set_result(backend)

    def _take(self, now: float) -> Backend | None:
        """A free slot chosen by the routing policy, counted as taken; None if none is."""
        ready = self._registry.ready(self.name)
        for backend in ready:
            if backend.readings != backend.capped_at and backend.running is not None:
                backend.cap = gauge_cap(backend.cap, backend.running, backend.waiting or 0)
                backend.capped_at = backend.readings
        target = self._target()
        free = [b for b in ready if has_free_slot(b, slot_limit(target, b.cap), now)]
        job_id = pick_backend(free, self._turn, now)
        if job_id is None:
            return None
        self._turn += 1
        backend = next(b for b in free if b.job_id == job_id)
        backend.in_flight += 1
        if backend.failures:  # a trial: others skip it until it answers or fails
            backend.retry_at = now + retry_delay(backend.failures)
        self.dispatched.append(now)
        return backend

    def expected_wait(self, now: float) -> float:
        """About how long a request arriving now would wait, at the recent dispatch rate."""
        return expected_wait(len(self.queue) + 1, list(self.dispatched), now)
