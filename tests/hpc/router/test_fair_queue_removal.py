"""Requests that leave the fair queue unserved (cancelled by the client, timed out) cost
their user nothing: the user's other and later requests are tagged as if the removed ones
had never arrived (hpc/router/fair_queue.py). Pure: no clock, no I/O."""

from __future__ import annotations

from hpc.router.fair_queue import FairQueue, Ticket
from tests.hpc.router.test_fair_queue import pops, push


def test_a_user_whose_requests_timed_out_is_not_sent_to_the_back() -> None:
    queue: FairQueue[str] = FairQueue()
    push(queue, "gone", 10)  # waited, then all gave up (queue timeout, clients left)
    push(queue, "b", 3)
    for i in range(10):
        assert queue.remove(f"gone{i}")
    queue.push("back0", Ticket("gone", "interactive", 1.0, 20.0))  # a retry
    assert pops(queue, 4) == ["b0", "back0", "b1", "b2"]  # shares like a newcomer


def test_a_request_removed_from_the_middle_moves_its_flow_up() -> None:
    queue: FairQueue[str] = FairQueue()
    push(queue, "a", 3)
    push(queue, "c", 3)
    assert queue.remove("a1")
    assert pops(queue, 5) == ["a0", "c0", "a2", "c1", "c2"]
