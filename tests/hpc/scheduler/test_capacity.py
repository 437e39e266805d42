"""Slurm-aware capacity (pure): the predicted wait for a cold service, and that a burst
does not flood Slurm with submissions while jobs are pending."""

from __future__ import annotations

from hpc.config import ServiceConfig
from hpc.jobs.system import JobInfo
from hpc.scheduler.capacity import DEFAULT_LOAD_TIME, load_time, predicted_wait
from hpc.scheduler.policy import JobView, LoadSample, ServiceSnapshot, Snapshot, Submit, decide

CONFIG = ServiceConfig(name="m", model="x", min_instances=1, max_instances=8, target_concurrency=4)


def job(job_id: str, state: str = "PENDING", **fields: object) -> JobView:
    info = JobInfo(job_id, "m", state, 3600, 3600, None, 0.0, (), "")
    return JobView(info=info, first_seen=0.0, **fields)  # type: ignore[arg-type]


def service(*jobs: JobView, load: int = 0, now: float = 100.0) -> ServiceSnapshot:
    return ServiceSnapshot(config=CONFIG, jobs=jobs, load=(LoadSample(now, load),))


def test_predicted_wait_takes_the_earliest_instance() -> None:
    pending = job("1", expected_start=400.0)
    loading = job("2", "RUNNING", running_since=50.0)
    assert predicted_wait(service(pending), 100.0, load_time=180) == 480.0
    assert predicted_wait(service(pending, loading), 100.0, load_time=180) == 130.0
    ready = job("3", "RUNNING", running_since=0.0, ready_since=10.0)
    assert predicted_wait(service(pending, ready), 100.0, load_time=180) == 0.0


def test_predicted_wait_unknown_without_an_estimate() -> None:
    assert predicted_wait(service(), 100.0, load_time=180) is None
    assert predicted_wait(service(job("1")), 100.0, load_time=180) is None
    draining = job("2", "RUNNING", running_since=0.0, ready_since=1.0, draining=True)
    assert predicted_wait(service(draining), 100.0, load_time=180) is None
    late = job("3", "RUNNING", running_since=99.0)
    assert predicted_wait(service(late), 1000.0, load_time=180) == 0.0  # overdue: any moment


def test_a_burst_counts_pending_jobs_instead_of_flooding() -> None:
    # 100 requests waiting: 25 instances wanted, capped at max_instances 8; 3 already pending
    pending = [job(str(i)) for i in range(3)]
    first = decide(Snapshot(services=(service(*pending, load=100),)), 100.0)
    assert sum(isinstance(a, Submit) for a in first.actions) == 5
    eight = [job(str(i)) for i in range(8)]
    again = decide(Snapshot(services=(service(*eight, load=100),)), 105.0)
    assert not any(isinstance(a, Submit) for a in again.actions)


def test_load_time_is_the_longest_seen_else_the_default() -> None:
    assert load_time(service(job("1"))) == DEFAULT_LOAD_TIME
    quick = job("2", "RUNNING", running_since=0.0, ready_since=40.0)
    slow = job("3", "RUNNING", running_since=10.0, ready_since=310.0)
    assert load_time(service(job("1"), quick)) == 40.0
    assert load_time(service(quick, slow)) == 300.0


def test_a_burst_waits_while_slurm_expects_the_pending_jobs_late() -> None:
    # the pending jobs start after startup_timeout (900 s): more would queue behind them
    late = [job(str(i), expected_start=100.0 + 3600) for i in range(3)]
    held = decide(Snapshot(services=(service(*late, load=100),)), 100.0)
    assert not any(isinstance(a, Submit) for a in held.actions)
    soon = [job(str(i), expected_start=160.0) for i in range(3)]
    more = decide(Snapshot(services=(service(*soon, load=100),)), 100.0)
    assert sum(isinstance(a, Submit) for a in more.actions) == 5


def test_min_instances_are_submitted_even_behind_a_late_job() -> None:
    config = CONFIG.model_copy(update={"min_instances": 3})
    late = job("1", expected_start=100.0 + 3600)
    snapshot = ServiceSnapshot(config=config, jobs=(late,), load=(LoadSample(100.0, 100),))
    actions = decide(Snapshot(services=(snapshot,)), 100.0).actions
    assert [a.reason for a in actions if isinstance(a, Submit)] == ["min_instances"] * 2
