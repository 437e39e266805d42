"""The waiting requests of one service, in weighted fair order (pure: no clock, no I/O).

Start-time fair queueing (SFQ, Goyal et al. 1996) over flows, one flow per user: a request
gets a start tag S = max(V, F_flow) and a finish tag F = S + 1/weight when it arrives, where
V is the start tag of the request dispatched last and F_flow the finish tag of the flow's
previous request. The next free backend slot goes to the request with the lowest start tag
(ties: arrival order). A user with 64 requests waiting holds tags V, V+1, ..., V+63; a user
who arrives with one request gets V and goes next, so under contention every active user
gets an equal share of dispatches (weight w: w times the share), and an idle user gains no
credit (its tag starts at V). SFQ needs no per-request cost estimate (a request's tokens
are unknown until it ends) and is O(flows) per dispatch without a tag overflow problem.

Two classes, each its own SFQ: `interactive` goes first, but while batch requests wait, at
least one of every `batch_every` dispatches goes to batch. So the first batch request waits
at most `batch_every - 1` interactive dispatches; the k-th in batch order at most
k * batch_every dispatches in all: batch yields, and is never starved.

With `fair=False` everything is one FIFO (the behaviour before fair queueing, for the
benchmark's comparison).
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

Class = Literal["interactive", "batch"]
CLASSES: tuple[Class, ...] = ("interactive", "batch")
T = TypeVar("T")
MAX_IDLE_FLOWS = 4096  # finish tags kept of users with nothing waiting


@dataclass(frozen=True)
class Ticket:
    """What the queue knows of one waiting request."""

    flow: str  # who: the user, else the key ("" when the hub sent no identity)
    klass: Class = "interactive"
    weight: float = 1.0
    arrival: float = 0.0  # the caller's clock; only reported back (oldest wait)


@dataclass
class _Entry(Generic[T]):
    start: float
    seq: int
    item: T
    ticket: Ticket


@dataclass
class _ClassQueue(Generic[T]):
    """One class's SFQ: per-flow FIFOs, the flows' last finish tags, virtual time V."""

    virtual: float = 0.0
    flows: dict[str, deque[_Entry[T]]] = field(default_factory=dict)
    finish: dict[str, float] = field(default_factory=dict)
    size: int = 0

    def push(self, entry: _Entry[T]) -> None:
        flow = entry.ticket.flow
        start = max(self.virtual, self.finish.get(flow, 0.0))
        entry.start = start
        self.finish[flow] = start + 1.0 / entry.ticket.weight
        self.flows.setdefault(flow, deque()).append(entry)
        self.size += 1

    def pop(self) -> _Entry[T]:
        flow, queue = min(self.flows.items(), key=lambda pair: (pair[1][0].start, pair[1][0].seq))
        entry = queue.popleft()
        if not queue:
            del self.flows[flow]
        self.virtual = max(self.virtual, entry.start)
        self.size -= 1
        self._trim()
        return entry

    def pass_through(self, ticket: Ticket) -> None:
        """A request dispatched at once, nobody waiting: tagged as if pushed and popped."""
        start = max(self.virtual, self.finish.get(ticket.flow, 0.0))
        self.finish[ticket.flow] = start + 1.0 / ticket.weight
        self.virtual = start
        self._trim()

    def _trim(self) -> None:
        if not self.size and len(self.finish) > MAX_IDLE_FLOWS:
            # Many users came and went with nobody waiting: all start equal again (SFQ's
            # end of a busy period), which keeps the map bounded.
            self.virtual = max(self.virtual, max(self.finish.values(), default=0.0))
            self.finish.clear()
        elif len(self.finish) > 2 * len(self.flows) + 64:
            # Finish tags at or below V no longer matter: drop them to keep the map small.
            self.finish = {f: t for f, t in self.finish.items() if t > self.virtual}

    def remove(self, item: T) -> bool:
        for flow, queue in self.flows.items():
            for index, entry in enumerate(queue):
                if entry.item == item:
                    del queue[index]
                    self._give_back(flow, queue, index, 1.0 / entry.ticket.weight)
                    if not queue:
                        del self.flows[flow]
                    self.size -= 1
                    return True
        return False

    def _give_back(self, flow: str, queue: deque[_Entry[T]], index: int, cost: float) -> None:
        """A request left unserved (cancelled, timed out): the flow's later requests and
        its next one are tagged as if it had never arrived, else a user whose requests
        timed out would go behind everyone with its retries. Exact: the tags of one flow's
        waiting requests are consecutive (none can start below V while another waits)."""
        for later in itertools.islice(queue, index, None):
            later.start -= cost
        if flow in self.finish:
            self.finish[flow] -= cost


class FairQueue(Generic[T]):
    """Waiting requests of one service; `pop()` is the fair-queueing decision."""

    def __init__(self, fair: bool = True, batch_every: int = 8) -> None:
        self.fair = fair
        self.batch_every = max(2, batch_every)
        self._classes: dict[Class, _ClassQueue[T]] = {c: _ClassQueue() for c in CLASSES}
        self._seq = 0
        self._streak = 0  # interactive dispatches in a row while batch waited

    def __len__(self) -> int:
        return sum(q.size for q in self._classes.values())

    def push(self, item: T, ticket: Ticket) -> None:
        if not self.fair:  # one flow, one class: arrival order
            ticket = Ticket("", "interactive", 1.0, ticket.arrival)
        self._seq += 1
        self._classes[ticket.klass].push(_Entry(0.0, self._seq, item, ticket))

    def pop(self) -> T | None:
        """The request that gets the next free slot, taken out of the queue."""
        interactive, batch = self._classes["interactive"], self._classes["batch"]
        if batch.size and (not interactive.size or self._streak >= self.batch_every - 1):
            self._streak = 0
            return batch.pop().item
        if not interactive.size:
            return None
        self._streak = self._streak + 1 if batch.size else 0
        return interactive.pop().item

    def pass_through(self, ticket: Ticket) -> None:
        """A request that got a slot at once because nothing waited (`len(self) == 0`):
        the flow's tags advance exactly as a push() then pop() would advance them."""
        if self.fair:
            self._classes[ticket.klass].pass_through(ticket)
        self._streak = 0

    def remove(self, item: T) -> bool:
        """Take a request out that no longer waits (cancelled, timed out)."""
        return any(q.remove(item) for q in self._classes.values())

    def waiting(self, flow: str) -> int:
        """Requests of `flow` waiting (in both classes)."""
        if not self.fair:
            return 0  # FIFO keeps no flows
        return sum(len(q.flows.get(flow, ())) for q in self._classes.values())

    def oldest_arrival(self) -> float | None:
        arrivals = [
            entry.ticket.arrival
            for queue in self._classes.values()
            for flow in queue.flows.values()
            for entry in flow
        ]
        return min(arrivals, default=None)
