"""Scale-down victims when an operator drain is pending, and load history across an agent
restart (issue 18), decided on hand-made snapshots."""

from __future__ import annotations

from hpc.scheduler.policy import Cancel, Drain, decide
from tests.hpc.scheduler.test_policy import NOW, job, service, snap


def test_scale_down_takes_the_job_marked_for_an_operator_drain() -> None:
    # The trial: job 4 marked for drain, min_instances 2 -> 1 cancelled the healthy job 5
    # and then handed job 4 over to a new job.
    marked = job("4", operator_drain="replace", time_left=3000)
    healthy = job("5", time_left=900)
    config = service(min_instances=1, max_instances=1)
    actions = decide(snap(marked, healthy, config=config), NOW).actions
    assert actions == (Drain("llm", "4", "scale down"),)


def test_scale_down_ends_an_operator_hand_over_under_way() -> None:
    marked = job("4", operator_drain="replace")
    successor = job("6", state="PENDING", ready=False, first_seen=NOW - 5, replaces="4")
    healthy = job("5", time_left=900)
    config = service(min_instances=1, max_instances=1)
    actions = decide(snap(marked, successor, healthy, config=config), NOW).actions
    assert actions == (
        Drain("llm", "4", "scale down"),
        Cancel("llm", "6", "scale down: 4 drains instead"),
    )
