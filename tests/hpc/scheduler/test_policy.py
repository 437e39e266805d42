"""The scheduling policy, decided on hand-made snapshots (no mocks, no clock)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from hpc.config import ServiceConfig
from hpc.jobs.system import JobInfo
from hpc.scheduler.policy import (
    Backoff,
    Cancel,
    Drain,
    JobView,
    LoadSample,
    LostJob,
    ServiceSnapshot,
    Snapshot,
    Submit,
    Warn,
    after_failure,
    decide,
    desired_instances,
)

NOW = 100_000.0


def service(**overrides: Any) -> ServiceConfig:
    values: dict[str, Any] = {
        "name": "llm",
        "model": "/m",
        "min_instances": 1,
        "max_instances": 4,
        "target_concurrency": 2,
        "renewal_lead": 60,
        "startup_timeout": 300,
        "look_back": 30,
        "scale_down_delay": 120,
        "startup_backoff": 10,
        "startup_backoff_max": 80,
        "resources": {"gpus": 1, "time_limit": "1:00:00"},
    }
    values.update(overrides)
    return ServiceConfig.model_validate(values)


def job(
    job_id: str,
    *,
    state: str = "RUNNING",
    ready: bool = True,
    time_left: int | None = 3000,
    first_seen: float = NOW - 600,
    **fields: Any,
) -> JobView:
    info = JobInfo(
        job_id=job_id,
        service="llm",
        state=state,
        time_limit_s=3600,
        time_left_s=time_left,
        start_time=None,
        submit_time=None,
        nodes=("n1",),
        reason="Resources" if state == "PENDING" else "",
    )
    running_since = first_seen + 10 if state == "RUNNING" else None
    return JobView(
        info=info,
        first_seen=first_seen,
        running_since=fields.pop("running_since", running_since),
        ready_since=fields.pop("ready_since", first_seen + 20 if ready else None),
        **fields,
    )


def snap(*jobs: JobView, config: ServiceConfig | None = None, **fields: Any) -> Snapshot:
    top = {k: fields.pop(k) for k in ("max_total_gpus", "health_failures") if k in fields}
    one = ServiceSnapshot(config=config or service(), jobs=tuple(jobs), **fields)
    return Snapshot(services=(one,), **top)


def loads(*values: int, step: float = 5.0) -> tuple[LoadSample, ...]:
    """Samples ending now, `step` seconds apart, oldest first."""
    count = len(values)
    return tuple(LoadSample(NOW - (count - 1 - i) * step, routed=v) for i, v in enumerate(values))


def submits(snapshot: Snapshot, now: float = NOW) -> list[Submit]:
    return [a for a in decide(snapshot, now).actions if isinstance(a, Submit)]


def test_min_instances_are_submitted() -> None:
    actions = submits(snap(config=service(min_instances=2)))
    assert [(a.service, a.reason) for a in actions] == [("llm", "min_instances")] * 2


def test_steady_state_does_nothing() -> None:
    assert decide(snap(job("1")), NOW).actions == ()


def test_pending_job_counts_as_instance() -> None:
    assert submits(snap(job("1", state="PENDING", ready=False, first_seen=NOW - 5))) == []


def test_scale_up_at_once_on_load() -> None:
    actions = submits(snap(job("1"), load=loads(0, 0, 7)))  # ceil(7 / 2) = 4
    assert [a.reason for a in actions] == ["load"] * 3


def test_never_more_than_max() -> None:
    actions = submits(snap(job("1"), load=loads(100), config=service(max_instances=2)))
    assert len(actions) == 1


def test_requests_waiting_inside_the_backends_scale_up() -> None:
    # The router forwards 2, but vLLM holds 7 (5 came by another path or queue inside it).
    sample = LoadSample(NOW, routed=2, in_backends=7)
    actions = submits(snap(job("1"), load=(sample,)))  # ceil(7 / 2) = 4 instances
    assert [a.reason for a in actions] == ["load"] * 3


def test_routed_and_backend_counts_are_not_added() -> None:
    # The same 4 requests seen by both: ceil(4 / 2) = 2 instances, not ceil(8 / 2) = 4.
    both = ServiceSnapshot(config=service(), load=(LoadSample(NOW, routed=4, in_backends=4),))
    assert desired_instances(both, NOW) == 2
    # The router's queue counts when the backends report less (or nothing).
    routed = ServiceSnapshot(config=service(), load=(LoadSample(NOW, routed=5, in_backends=1),))
    assert desired_instances(routed, NOW) == 3


def test_backend_load_holds_instances_through_the_scale_down_delay() -> None:
    jobs = (job("1"), job("2"), job("3"))
    # vLLM reported 6 running or waiting 100 s ago (inside look_back + delay = 150 s).
    recent = (LoadSample(NOW - 100, 0, in_backends=6), LoadSample(NOW, 0, in_backends=0))
    assert decide(snap(*jobs, load=recent), NOW).actions == ()
    old = (LoadSample(NOW - 200, 0, in_backends=6), LoadSample(NOW, 0, in_backends=1))
    drains = [a for a in decide(snap(*jobs, load=old), NOW).actions if isinstance(a, Drain)]
    assert len(drains) == 2


def test_scale_down_waits_for_delay() -> None:
    jobs = (job("1"), job("2"), job("3"))
    # load 6 (3 instances) 100 s ago, nothing since: still inside look_back + delay = 150 s
    recent = (LoadSample(NOW - 100, 6), LoadSample(NOW, 0))
    assert decide(snap(*jobs, load=recent), NOW).actions == ()
    old = (LoadSample(NOW - 200, 6), LoadSample(NOW, 0))
    drains = [a for a in decide(snap(*jobs, load=old), NOW).actions if isinstance(a, Drain)]
    assert len(drains) == 2  # down to min_instances 1


def test_scale_down_prefers_unready_then_least_time_left() -> None:
    jobs = (
        job("1", time_left=3000),
        job("2", time_left=900),
        job("3", state="PENDING", ready=False, first_seen=NOW - 5),
    )
    actions = decide(snap(*jobs, config=service(min_instances=1)), NOW).actions
    assert actions == (
        Cancel("llm", "3", "scale down"),
        Drain("llm", "2", "scale down"),
    )


def test_cap_on_total_gpus() -> None:
    config = service(min_instances=3, resources={"gpus": 2, "nodes": 1})
    actions = decide(snap(job("1"), config=config, max_total_gpus=5), NOW).actions
    assert [type(a) for a in actions] == [Submit, Warn]  # 2 used + 2 = 4; one more = 6 > 5
    assert "max_total_gpus 5" in actions[1].message  # type: ignore[union-attr]


def test_gpu_cap_counts_nodes_and_admits_min_before_load() -> None:
    a = service(name="a", min_instances=0, max_instances=2, resources={"gpus": 1, "nodes": 2})
    b = service(name="b", min_instances=1, max_instances=1, resources={"gpus": 2})
    snapshot = Snapshot(
        services=(
            ServiceSnapshot(config=a, load=loads(1)),  # wants 1 by load: 2 GPUs
            ServiceSnapshot(config=b),  # wants 1 by min_instances: 2 GPUs
        ),
        max_total_gpus=3,
    )
    actions = decide(snapshot, NOW).actions
    assert Submit("b", "min_instances") in actions
    assert not any(isinstance(x, Submit) and x.service == "a" for x in actions)


def test_scale_from_zero_on_demand() -> None:
    config = service(min_instances=0)
    assert submits(snap(config=config)) == []
    assert [a.reason for a in submits(snap(config=config, demand_since=NOW - 1))] == ["load"]


def test_startup_timeout_cancels_and_backs_off() -> None:
    stuck = job("1", ready=False, first_seen=NOW - 400, running_since=NOW - 301)
    decision = decide(snap(stuck), NOW)
    assert decision.actions[0] == Cancel("llm", "1", "not ready 300s after it started")
    assert decision.backoff["llm"] == Backoff(failures=1, last_failure=NOW, not_before=NOW + 10)
    # the replacement waits for the backoff, with a warning saying so
    assert not any(isinstance(a, Submit) for a in decision.actions)
    warnings = [a.message for a in decision.actions if isinstance(a, Warn)]
    assert warnings == ["1 failed start(s) in a row: next submission in 10s"]


def test_replacement_after_backoff_expires() -> None:
    backoff = Backoff(failures=1, last_failure=NOW - 20, not_before=NOW - 10)
    assert [a.reason for a in submits(snap(backoff=backoff))] == ["min_instances"]


def test_starting_job_within_timeout_is_kept() -> None:
    starting = job("1", ready=False, first_seen=NOW - 100, running_since=NOW - 90)
    assert decide(snap(starting), NOW).actions == ()


def test_backoff_grows_and_is_capped() -> None:
    config = service()
    backoff = Backoff()
    waits = []
    for _ in range(6):
        backoff = after_failure(backoff, NOW, config)
        assert backoff.not_before is not None
        waits.append(backoff.not_before - NOW)
    assert waits == [10, 20, 40, 80, 80, 80]


def test_job_lost_before_ready_is_a_failure_but_cancelled_or_served_ones_are_not() -> None:
    lost = (LostJob("7", was_ready=False, cancelled=False),)
    assert decide(snap(lost=lost), NOW).backoff["llm"].failures == 1
    fine = (LostJob("8", was_ready=True, cancelled=False), LostJob("9", False, cancelled=True))
    decision = decide(snap(lost=fine), NOW)
    assert decision.backoff["llm"] == Backoff()
    assert [a.reason for a in decision.actions if isinstance(a, Submit)] == ["min_instances"]


def test_backoff_resets_when_a_start_succeeds() -> None:
    backoff = Backoff(failures=3, last_failure=NOW - 50, not_before=NOW + 30)
    ready_after = job("1", ready_since=NOW - 10)
    assert decide(snap(ready_after, backoff=backoff), NOW).backoff["llm"] == Backoff()
    ready_before = job("1", ready_since=NOW - 500)
    assert decide(snap(ready_before, backoff=backoff), NOW).backoff["llm"] == backoff


def test_renewal_submits_exactly_one_replacement() -> None:
    old = job("1", time_left=59)
    assert submits(snap(old)) == [Submit("llm", "renewal", replaces="1")]
    starting = job("2", ready=False, first_seen=NOW - 5, replaces="1")
    assert decide(snap(old, starting), NOW).actions == ()


def test_no_renewal_for_unlimited_or_far_jobs() -> None:
    assert submits(snap(job("1", time_left=None))) == []
    assert submits(snap(job("1", time_left=61))) == []


def test_renewal_does_not_count_as_scaling() -> None:
    old = job("1", time_left=30)
    new = job("2", ready=False, first_seen=NOW - 5, replaces="1")
    # max_instances 1 still allows the replacement; and no extra job beyond it
    config = service(max_instances=1)
    assert decide(snap(old, new, config=config, load=loads(50)), NOW).actions == ()


def test_old_job_drains_when_replacement_ready() -> None:
    old = job("1", time_left=30, in_flight=2)
    new = job("2", replaces="1", ready_since=NOW - 1)
    assert decide(snap(old, new), NOW).actions == (Drain("llm", "1", "replaced by 2"),)


def test_draining_job_cancelled_once_idle_or_out_of_time() -> None:
    busy = job("1", time_left=30, draining=True, in_flight=1)
    new = job("2", replaces="1")
    assert decide(snap(busy, new), NOW).actions == ()
    idle = replace(busy, in_flight=0)
    assert decide(snap(idle, new), NOW).actions == (Cancel("llm", "1", "drained"),)
    late = job("1", time_left=3, draining=True, in_flight=4)
    assert decide(snap(late, new), NOW).actions == (Cancel("llm", "1", "drained"),)


def test_unhealthy_job_is_cancelled_and_replaced() -> None:
    sick = job("1", health_failures=3)
    actions = decide(snap(sick, health_failures=3), NOW).actions
    assert actions == (
        Cancel("llm", "1", "unhealthy: 3 failed health checks in a row"),
        Submit("llm", "min_instances"),
    )
    assert decide(snap(job("1", health_failures=2), health_failures=3), NOW).actions == ()


def test_pending_too_long_is_reported_and_kept() -> None:
    waiting = job("1", state="PENDING", ready=False, first_seen=NOW - 301)
    actions = decide(snap(waiting), NOW).actions
    assert actions == (Warn("llm", "pending for 301s (Resources)", "1"),)


def test_cancelled_job_is_not_an_instance_but_holds_gpus() -> None:
    gone = job("1", cancelled=True)
    config = service(resources={"gpus": 2})
    actions = decide(snap(gone, config=config, max_total_gpus=3), NOW).actions
    assert [type(a) for a in actions] == [Warn]


def test_orphans_are_cancelled_once() -> None:
    orphan = job("9")
    snapshot = Snapshot(services=(), orphans=(orphan,))
    assert decide(snapshot, NOW).actions == (Cancel("llm", "9", "service no longer configured"),)
    done = Snapshot(services=(), orphans=(replace(orphan, cancelled=True),))
    assert decide(done, NOW).actions == ()


def test_desired_instances_stays_within_bounds() -> None:
    one = ServiceSnapshot(config=service(min_instances=1, max_instances=3), load=loads(0))
    assert desired_instances(one, NOW) == 1
    many = ServiceSnapshot(config=service(min_instances=1, max_instances=3), load=loads(99))
    assert desired_instances(many, NOW) == 3
    # samples older than look_back + scale_down_delay are ignored
    stale = ServiceSnapshot(config=service(), load=(LoadSample(NOW - 151, 50),))
    assert desired_instances(stale, NOW) == 1


def test_operator_drain_submits_a_replacement_then_drains() -> None:
    old = job("1", operator_drain="replace")
    assert submits(snap(old)) == [Submit("llm", "operator drain", replaces="1")]
    starting = job("2", ready=False, first_seen=NOW - 5, replaces="1")
    assert decide(snap(old, starting, config=service(max_instances=1)), NOW).actions == ()
    new = job("2", replaces="1", ready_since=NOW - 1)
    actions = decide(snap(old, new), NOW).actions
    assert actions == (Drain("llm", "1", "operator: replaced by 2"),)


def test_operator_drains_of_a_service_go_one_at_a_time_oldest_first() -> None:
    older = job("1", operator_drain="replace", first_seen=NOW - 900)
    newer = job("2", operator_drain="replace", first_seen=NOW - 600)
    config = service(min_instances=2)
    assert submits(snap(older, newer, config=config)) == [
        Submit("llm", "operator drain", replaces="1")
    ]
    # while the first is draining (or still stopping), the second waits
    draining = replace(older, draining=True, in_flight=1)
    successor = job("3", ready_since=NOW - 1)
    assert submits(snap(draining, newer, successor, config=config)) == []
    stopping = replace(older, cancelled=True)
    assert submits(snap(stopping, newer, successor, config=config)) == []
    # once it is gone, the next one's hand-over starts
    assert submits(snap(newer, successor, config=config)) == [
        Submit("llm", "operator drain", replaces="2")
    ]


def test_operator_drain_now_drains_at_once_and_scaling_replaces_it() -> None:
    actions = decide(snap(job("1", operator_drain="now", in_flight=2)), NOW).actions
    assert actions == (Drain("llm", "1", "operator: now"), Submit("llm", "min_instances"))


def test_operator_drain_of_a_job_not_serving_yet_cancels_it() -> None:
    pending = job("1", state="PENDING", ready=False, first_seen=NOW - 5, operator_drain="replace")
    actions = decide(snap(pending), NOW).actions
    assert actions == (
        Cancel("llm", "1", "operator: drained before it served"),
        Submit("llm", "min_instances"),
    )


def test_orphans_with_requests_in_flight_drain_before_they_are_cancelled() -> None:
    busy = job("9", in_flight=2)
    assert decide(Snapshot(services=(), orphans=(busy,)), NOW).actions == (
        Drain("llm", "9", "service no longer configured"),
    )
    assert decide(Snapshot(services=(), orphans=(replace(busy, draining=True),)), NOW).actions == ()
    late = replace(busy, draining=True, info=replace(busy.info, time_left_s=3))
    assert decide(Snapshot(services=(), orphans=(late,)), NOW).actions == (
        Cancel("llm", "9", "service no longer configured"),
    )
