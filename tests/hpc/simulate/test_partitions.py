"""Slurm's queues in the simulated world: GPU limits, predictions and their error."""

from __future__ import annotations

import math

import pytest

from hpc.scheduler.policy import Cancel, Decision, Snapshot, Submit
from hpc.simulate.config import ConfigError
from hpc.simulate.engine import Policy, simulate
from hpc.simulate.partitions import Partitions
from hpc.simulate.report import summarize
from hpc.simulate.run import POLICY
from hpc.simulate.world import SimJob
from tests.hpc.simulate.test_simulate import requests, service, world


def job(number: int, gpus: int = 1) -> SimJob:
    return SimJob(str(number), "m", gpus, submitted=0.0, time_limit_s=3600.0)


def queues(**overrides: object) -> Partitions:
    return Partitions(world(service(), **overrides), seed=1)


def test_queues_are_found_by_partition_qos_then_partition_then_default() -> None:
    parts = queues(
        queues={
            "gpu/short": {"median": "10s", "p95": "10s"},
            "gpu": {"median": "1m", "p95": "1m"},
            "default": {"median": "1h", "p95": "1h"},
        }
    )
    assert parts.of("gpu", "short").key == "gpu/short"
    assert parts.of("gpu", "long").key == "gpu"
    assert parts.of("big", None).key == "default"
    assert parts.of("gpu", None) is parts.of("gpu", "other")  # one queue, one GPU count


def test_a_full_partition_starts_the_next_job_when_one_of_ours_ends() -> None:
    parts = queues(queues={"gpu": {"median": "1m", "p95": "1m", "gpus": 1}})
    queue = parts.of("gpu", None)
    first, second = job(1), job(2)
    assert parts.plan(first, queue, 0.0) == 60.0
    assert parts.try_start(first, 60.0)
    first.started = 60.0
    assert parts.plan(second, queue, 100.0) == 160.0  # its own queue wait...
    assert second.planned_start == 60.0 + 3600.0  # ...but Slurm plans it after first's limit
    assert not parts.try_start(second, 160.0)
    assert parts.predict(queue, 1, 200.0) == 7260.0  # --test-only: after second, too
    assert parts.release(first) == [second]  # first ended: second gets its GPU
    assert queue.running == [second]


def test_slurm_plans_a_new_job_behind_ours_already_queued_in_a_full_partition() -> None:
    parts = queues(queues={"small": {"median": "10s", "p95": "10s", "gpus": 1}})
    queue = parts.of("small", None)
    assert parts.predict(queue, 1, 0.0) == 10.0  # free: its own wait
    parts.plan(job(1), queue, 0.0)  # ours, starting at 10 s for up to an hour
    assert parts.predict(queue, 1, 5.0) == 3610.0  # behind it, though nothing runs yet


def test_a_job_waiting_for_a_gpu_of_ours_is_ahead_of_a_new_one() -> None:
    parts = queues(queues={"small": {"median": "10s", "p95": "10s", "gpus": 1}})
    queue = parts.of("small", None)
    first, second = job(1), job(2)
    parts.plan(first, queue, 0.0)
    assert parts.try_start(first, 10.0)
    first.started = 10.0
    parts.plan(second, queue, 0.0)
    assert not parts.try_start(second, 10.0)  # waited out the queue; first holds the GPU
    assert second.planned_start == 3610.0
    assert parts.predict(queue, 1, 20.0) == 7210.0  # a new job comes after second too


def test_a_prediction_is_the_next_jobs_wait_with_the_error() -> None:
    exact = queues(queues={"gpu": {"median": "1m", "p95": "10m"}})
    queue = exact.of("gpu", None)
    predicted = exact.predict(queue, 1, 0.0)
    assert exact.plan(job(1), queue, 30.0) == predicted + 30.0  # the same wait, exactly
    rough = queues(queues={"gpu": {"median": "1m", "p95": "10m"}}, estimate_error=0.5)
    queue = rough.of("gpu", None)
    ratios = []
    for number in range(400):
        predicted = rough.predict(queue, 1, 0.0)
        started = rough.plan(job(number), queue, 0.0)
        ratios.append(predicted / started)
    logs = sorted(math.log(r) for r in ratios)
    assert 0.35 < logs[300] - logs[100] < 0.8  # interquartile of N(0, 0.5): 0.67
    assert abs(logs[200]) < 0.1  # unbiased: the median error is 1


def test_a_stale_prediction_does_not_bind_the_next_job() -> None:
    parts = queues(queues={"gpu": {"median": "1m", "p95": "1h"}}, placement_probe_interval=60)
    queue = parts.of("gpu", None)
    predicted = parts.predict(queue, 1, 0.0)
    assert queue.next_wait is not None
    assert parts.plan(job(1), queue, 120.0) != 120.0 + predicted  # asked 2 min ago: a new draw
    assert queue.next_wait is None


def test_a_preemptible_queue_has_its_own_rate() -> None:
    config = world(
        service(),
        queues={"gpu": {"median": "0s", "p95": "0s", "preemptions_per_gpu_hour": 100}},
    )
    run = simulate(config, requests([10.0]), POLICY, seed=1, duration=3600)
    assert summarize(run).preempted >= 1  # the world's rate is 0


TWO = {
    "big": {"median": "10m", "p95": "10m"},
    "small": {"median": "10s", "p95": "10s", "gpus": 1},
}
PLACEMENTS = [{"name": "big", "partition": "big"}, {"name": "small", "partition": "small"}]


def soonest(snapshot: Snapshot, now: float) -> Decision:
    """A stand-in policy at the seam: one job, where Slurm predicts the soonest start."""
    service = snapshot.services[0]
    if service.jobs or not service.placement_starts:
        return Decision(actions=(), backoff={})
    best = min(service.placement_starts, key=lambda p: p.start or float("inf"))
    return Decision(actions=(Submit("m", "test", placement=best.placement),), backoff={})


def test_the_world_answers_test_only_per_placement_and_starts_the_job_where_placed() -> None:
    config = world(service(min_instances=0, placements=PLACEMENTS), queues=TWO)
    seen: list[Snapshot] = []

    def record(snapshot: Snapshot, now: float) -> Decision:
        seen.append(snapshot)
        return soonest(snapshot, now)

    run = simulate(config, requests([10.0]), Policy("t", record), seed=1, duration=120)
    assert seen[0].services[0].placement_starts == ()  # nothing to submit: no probe
    first = next(s for s in seen if s.services[0].placement_starts).services[0].placement_starts
    starts = {p.placement: (p.start or 0.0) - p.observed_at for p in first}
    assert starts == {"big": 600.0, "small": 10.0}  # each queue's own wait, exact here
    (job,) = run.jobs
    assert job.placement == "small" and job.queue_key == "small"
    assert job.started == job.submitted + 10.0
    assert summarize(run).served == 1
    views = [s.services[0].jobs for s in seen if s.services[0].jobs]
    assert views[0][0].placement == "small"


def test_a_move_names_the_pending_job_it_replaces() -> None:
    config = world(service(min_instances=0, placements=PLACEMENTS), queues=TWO)
    moved: list[bool] = []

    def move(snapshot: Snapshot, now: float) -> Decision:
        jobs = snapshot.services[0].jobs
        if not jobs:
            return Decision(actions=(Submit("m", "first", placement="big"),), backoff={})
        if len(jobs) == 1 and jobs[0].placement == "big":
            submit = Submit("m", "moved", placement="small", moves=jobs[0].job_id)
            return Decision(actions=(submit, Cancel("m", jobs[0].job_id, "moved")), backoff={})
        moved.append(jobs[0].moved_from == "1")
        return Decision(actions=(), backoff={})

    run = simulate(config, requests([10.0]), Policy("t", move), seed=1, duration=120)
    assert [j.end_reason for j in run.jobs] == ["cancelled", ""]
    assert run.jobs[1].placement == "small" and moved and all(moved)


def test_the_warm_floor_sits_on_a_placement_that_is_not_preemptible() -> None:
    placements = [{"name": "spot", "partition": "small", "preemptible": True}, PLACEMENTS[0]]
    config = world(service(placements=placements), queues=TWO)
    run = simulate(config, [], POLICY, seed=1, duration=600)
    (job,) = run.jobs  # the real policy keeps it: it holds the floor
    assert job.placement == "big" and job.ended is None


def test_the_real_policy_places_a_cold_start_where_slurm_predicts_it_sooner() -> None:
    config = world(service(min_instances=0, placements=PLACEMENTS), queues=TWO)
    placed = simulate(config, requests([10.0]), POLICY, seed=1, duration=60)
    pinned = simulate(config.fixed("big"), requests([10.0]), POLICY, seed=1, duration=60)
    assert [j.placement for j in placed.jobs] == ["small"]
    assert summarize(placed).felt_p50_s == pytest.approx(40.0)  # 10 s queue + 30 s load
    assert [j.queue_key for j in pinned.jobs] == ["big"]
    # 10 min in the queue: the router's 503 after 300 s says 480 s more (+ the default load
    # time), past the client's 10 minutes: it gave up
    assert summarize(pinned).failed == 1


def test_fixed_needs_a_placement_of_that_name() -> None:
    with pytest.raises(ConfigError, match="no service has a placement"):
        world(service(placements=PLACEMENTS), queues=TWO).fixed("nowhere")
