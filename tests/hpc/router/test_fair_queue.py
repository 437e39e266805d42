"""The fair-queueing policy (hpc/router/fair_queue.py and its pure helpers): no mocks, no clock.

Shares are counted over dispatches (`pop()`), each of which takes one backend slot.
"""

from __future__ import annotations

import json
from collections import Counter

from hpc.config import FairnessConfig, ServiceConfig
from hpc.router.fair_queue import Class, FairQueue, Ticket
from hpc.router.forwarding import BATCH_PRIORITY, retry_after, ticket_of, with_priority
from hpc.router.policy import expected_wait, gauge_cap, slot_limit
from saia.base.protocol import Caller


def push(
    queue: FairQueue[str], flow: str, count: int, klass: Class = "interactive", w: float = 1.0
) -> None:
    for i in range(count):
        queue.push(f"{flow}{i}", Ticket(flow, klass, w, float(i)))


def pops(queue: FairQueue[str], count: int) -> list[str]:
    return [item for _ in range(count) if (item := queue.pop()) is not None]


def owners(items: list[str]) -> Counter[str]:
    return Counter(item.rstrip("0123456789") for item in items)


def test_equal_weights_get_equal_shares_whatever_the_arrival_order() -> None:
    queue: FairQueue[str] = FairQueue()
    push(queue, "a", 60)  # a arrived first with the most requests
    push(queue, "b", 30)
    push(queue, "c", 10)
    assert owners(pops(queue, 30)) == {"a": 10, "b": 10, "c": 10}
    assert owners(pops(queue, 40)) == {"a": 20, "b": 20}  # c is done: a and b split it
    assert owners(pops(queue, 100)) == {"a": 30}  # alone, a gets every slot
    assert queue.pop() is None and len(queue) == 0


def test_a_light_user_behind_a_heavy_backlog_goes_next() -> None:
    queue: FairQueue[str] = FairQueue()
    push(queue, "heavy", 64)
    pops(queue, 5)
    queue.push("light0", Ticket("light", "interactive", 1.0, 5.0))
    assert pops(queue, 2) == ["light0", "heavy5"]
    # an idle user earns no credit: back after a pause, it shares equally, no more
    push(queue, "light", 10)
    assert owners(pops(queue, 10)) == {"heavy": 5, "light": 5}


def test_weights_are_respected() -> None:
    queue: FairQueue[str] = FairQueue()
    push(queue, "two", 100, w=2.0)
    push(queue, "one", 100, w=1.0)
    push(queue, "half", 100, w=0.5)
    assert owners(pops(queue, 70)) == {"two": 40, "one": 20, "half": 10}


def test_batch_waits_behind_interactive() -> None:
    queue: FairQueue[str] = FairQueue(batch_every=8)
    push(queue, "b", 3, "batch")
    push(queue, "i", 20)
    first = pops(queue, 7)
    assert owners(first) == {"i": 7}  # batch yields to interactive...
    assert pops(queue, 1) == ["b0"]  # ...until 7 interactive dispatches passed it
    assert owners(pops(queue, 7)) == {"i": 7}
    queue_alone: FairQueue[str] = FairQueue()
    push(queue_alone, "b", 3, "batch")
    assert pops(queue_alone, 3) == ["b0", "b1", "b2"]  # with no interactive, batch runs


def test_batch_is_never_starved_beyond_its_bound() -> None:
    """Interactive requests keep coming (always 5 waiting); the k-th batch request is
    dispatched within k * batch_every dispatches, and one of every batch_every is batch."""
    every = 5
    queue: FairQueue[str] = FairQueue(batch_every=every)
    push(queue, "b", 4, "batch")
    dispatched: list[str] = []
    for step in range(40):
        while len(queue) < 9:
            queue.push(f"i{step}{len(queue)}", Ticket(f"u{step % 3}", "interactive", 1.0, 0.0))
        item = queue.pop()
        assert item is not None
        dispatched.append(item)
    positions = [i + 1 for i, item in enumerate(dispatched) if item.startswith("b")]
    assert positions == [every, 2 * every, 3 * every, 4 * every]


def test_fifo_mode_is_arrival_order_whoever_sends() -> None:
    queue: FairQueue[str] = FairQueue(fair=False)
    push(queue, "heavy", 5)
    queue.push("light0", Ticket("light", "batch", 1.0, 9.0))
    assert pops(queue, 6) == ["heavy0", "heavy1", "heavy2", "heavy3", "heavy4", "light0"]


def test_a_removed_request_is_never_dispatched_and_counts_are_kept() -> None:
    queue: FairQueue[str] = FairQueue()
    push(queue, "a", 3)
    queue.push("b0", Ticket("b", "batch", 1.0, -1.0))
    assert (len(queue), queue.waiting("a"), queue.waiting("b")) == (4, 3, 1)
    assert queue.oldest_arrival() == -1.0
    assert queue.remove("b0") and not queue.remove("b0")
    assert queue.remove("a1")
    assert pops(queue, 5) == ["a0", "a2"]
    assert queue.oldest_arrival() is None


def test_many_short_lived_users_leave_little_state() -> None:
    queue: FairQueue[str] = FairQueue()
    for user in range(10_000):
        queue.push(f"x{user}", Ticket(f"user{user}", "interactive", 1.0, 0.0))
        assert queue.pop() == f"x{user}"
    assert len(queue._classes["interactive"].finish) <= 4097


def test_the_ticket_comes_from_the_hop_head_and_the_config() -> None:
    fairness = FairnessConfig(
        key_weights={"k2": 3.0}, group_weights={"physics": 2.0}, batch_keys=["kb"]
    )
    assert ticket_of(Caller("ann", "k1", "physics"), fairness, 1.0) == Ticket(
        "user:ann", "interactive", 2.0, 1.0
    )
    assert ticket_of(Caller("ann", "k2", "physics"), fairness, 1.0).weight == 3.0
    assert ticket_of(Caller("", "kb", ""), fairness, 1.0) == Ticket("key:kb", "batch", 1.0, 1.0)
    assert ticket_of(Caller("bob", "k1", "", "batch"), fairness, 1.0).klass == "batch"
    assert ticket_of(Caller(), fairness, 1.0) == Ticket("", "interactive", 1.0, 1.0)


def test_batch_gets_vllms_priority_only_where_the_backend_schedules_by_it() -> None:
    plain = ServiceConfig(name="m", model="m")
    ranked = ServiceConfig(name="m", model="m", vllm={"scheduling_policy": "priority"})
    body = b'{"model": "m", "messages": []}'
    assert with_priority(body, "batch", plain) is body
    assert with_priority(body, "interactive", ranked) is body
    assert json.loads(with_priority(body, "batch", ranked))["priority"] == BATCH_PRIORITY
    sneaky = b'{"model": "m", "priority": -100}'  # a client may not jump vLLM's queue
    assert json.loads(with_priority(sneaky, "interactive", ranked))["priority"] == 0
    assert with_priority(b"not json", "batch", ranked) == b"not json"


def test_slot_limits_follow_the_backends_gauges() -> None:
    assert slot_limit(8, None) == 8
    cap = gauge_cap(None, running=4, waiting=3)  # the backend runs 4 and queues the rest
    assert cap == 4 and slot_limit(8, cap) == 4
    assert gauge_cap(cap, running=4, waiting=0) == 5  # all it got ran: try one more
    assert gauge_cap(5, running=2, waiting=0) == 5  # not busy: no news
    assert gauge_cap(None, running=3, waiting=0) is None
    assert slot_limit(2, 6) == 2 and slot_limit(8, 0) == 1


def test_expected_wait_and_retry_after() -> None:
    assert expected_wait(10, [], 100.0) == 0.0
    # 10 dispatches over the last 5 s: 2 per second, so 10 waiting take about 5 s
    assert expected_wait(10, [95.0 + i * 0.5 for i in range(10)], 100.0) == 5.0
    assert expected_wait(10, [1.0, 2.0], 100.0) == 0.0  # too old to tell
    assert (retry_after(0.0), retry_after(4.6), retry_after(1e6)) == (1, 5, 300)


def test_passing_through_an_empty_queue_tags_like_a_push_and_pop() -> None:
    # The router's fast path (a free slot, nobody waiting) skips the queue; the users it
    # served must still be charged, or a heavy user's next request would tie a light one.
    tickets = [
        Ticket(f"user{i % 3}", "batch" if i % 5 == 0 else "interactive", 1 + i % 2)
        for i in range(40)
    ]
    through: FairQueue[str] = FairQueue()
    queued: FairQueue[str] = FairQueue()
    for i, ticket in enumerate(tickets):
        if i % 4 == 3:  # now and then a backlog forms, then drains
            for queue in (through, queued):
                queue.push(f"w{i}a", ticket)
                queue.push(f"w{i}b", Ticket("light"))
                assert queue.pop() is not None
                assert queue.pop() is not None
        through.pass_through(ticket)
        queued.push(f"r{i}", ticket)
        assert queued.pop() == f"r{i}"
    for queue in (through, queued):
        queue.push("heavy", Ticket(tickets[-1].flow))  # served last: tagged behind
        queue.push("new", Ticket("newcomer"))
    assert [through.pop(), through.pop()] == [queued.pop(), queued.pop()] == ["new", "heavy"]
