"""The scheduling policy with a job that fails its health checks while it still answers
requests (a preempted server: Slurm's SIGTERM closed its port, its open requests go on)."""

from __future__ import annotations

from hpc.scheduler.policy import Cancel, Drain, Submit, decide
from tests.hpc.scheduler.test_policy import NOW, job, snap

REASON = "unhealthy: 3 failed health checks in a row"


def test_an_unhealthy_job_with_requests_in_flight_is_drained_then_cancelled_when_idle() -> None:
    busy = job("1", health_failures=3, in_flight=4)
    assert decide(snap(busy, health_failures=3), NOW).actions == (
        Drain("llm", "1", REASON),
        Submit("llm", "min_instances"),  # replaced at once, as a cancelled one would be
    )
    draining = job("1", health_failures=5, in_flight=1, draining=True)
    replacement = job("2", state="PENDING", ready=False, first_seen=NOW - 2)
    assert decide(snap(draining, replacement, health_failures=3), NOW).actions == ()
    idle = job("1", health_failures=9, in_flight=0, draining=True)
    assert decide(snap(idle, replacement, health_failures=3), NOW).actions == (
        Cancel("llm", "1", "drained"),
    )


def test_an_unhealthy_idle_job_is_still_cancelled_at_once() -> None:
    assert decide(snap(job("1", health_failures=3), health_failures=3), NOW).actions == (
        Cancel("llm", "1", REASON),
        Submit("llm", "min_instances"),
    )
