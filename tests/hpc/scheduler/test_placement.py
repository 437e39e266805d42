"""Placement choice, the floor on guaranteed placements, moving pending jobs, and renewal
by the limit Slurm granted: the pure policy on hand-made snapshots (no mocks, no clock)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from hpc.config import ServiceConfig
from hpc.jobs.system import JobInfo
from hpc.scheduler.placement import placement_of
from hpc.scheduler.placement_probes import may_submit
from hpc.scheduler.policy import (
    Cancel,
    Drain,
    JobView,
    PlacementStart,
    ServiceSnapshot,
    Snapshot,
    Submit,
    decide,
)
from tests.hpc.scheduler.test_policy import NOW, job, loads, service

GUARANTEED = {"name": "guaranteed", "partition": "gpu", "qos": "normal"}
BURST = {"name": "burst", "partition": "scavenger", "preemptible": True}
RESERVED = {"name": "reserved", "reservation": "floor"}


def placed(**overrides: Any) -> ServiceConfig:
    return service(placements=[GUARANTEED, BURST, RESERVED], **overrides)


def starts(**by_name: float | None) -> tuple[PlacementStart, ...]:
    return tuple(PlacementStart(name, at, NOW - 5) for name, at in by_name.items())


def snap(*jobs: JobView, config: ServiceConfig | None = None, **fields: Any) -> Snapshot:
    top = {k: fields.pop(k) for k in ("max_total_gpus",) if k in fields}
    one = ServiceSnapshot(config=config or placed(), jobs=tuple(jobs), **fields)
    return Snapshot(services=(one,), **top)


def pending(job_id: str, placement: str, expected: float | None = None) -> JobView:
    view = job(job_id, state="PENDING", ready=False, first_seen=NOW - 5, placement=placement)
    return replace(view, expected_start=expected)


def submits(snapshot: Snapshot) -> list[Submit]:
    return [a for a in decide(snapshot, NOW).actions if isinstance(a, Submit)]


def where(snapshot: Snapshot) -> list[tuple[str, str]]:
    return [(s.reason, s.placement) for s in submits(snapshot)]


def test_a_new_job_goes_where_the_predicted_start_is_soonest() -> None:
    early = starts(guaranteed=NOW + 3600, burst=NOW + 10, reserved=NOW + 600)
    assert where(snap(placement_starts=early)) == [("min_instances", "reserved")]


def test_unknown_predictions_rank_after_known_and_ties_keep_config_order() -> None:
    assert where(snap(placement_starts=starts(guaranteed=None, reserved=NOW + 900))) == [
        ("min_instances", "reserved")
    ]
    tie = starts(guaranteed=NOW + 60, reserved=NOW + 60)
    assert where(snap(placement_starts=tie)) == [("min_instances", "guaranteed")]
    assert where(snap()) == [("min_instances", "guaranteed")]  # nothing known: config order


def test_the_floor_never_goes_to_a_preemptible_placement() -> None:
    early = starts(guaranteed=NOW + 7200, burst=NOW, reserved=None)
    config = placed(min_instances=2)
    assert where(snap(config=config, placement_starts=early)) == [
        ("min_instances", "guaranteed"),
        ("min_instances", "guaranteed"),
    ]


def test_load_above_the_floor_takes_a_preemptible_placement_when_it_starts_sooner() -> None:
    floor = job("1", placement="guaranteed")
    early = starts(guaranteed=NOW + 7200, burst=NOW + 30, reserved=None)
    got = where(snap(floor, load=loads(0, 0, 5), placement_starts=early))  # 3 wanted
    assert got == [("load", "burst"), ("load", "burst")]


def test_burst_instances_do_not_hold_the_floor() -> None:
    bursts = [job(str(n), placement="burst") for n in (1, 2)]
    got = where(snap(*bursts, load=loads(0, 0, 4), placement_starts=starts(reserved=NOW)))
    assert got == [("min_instances", "reserved")]
    # a job in no current placement (a reload changed them) holds no floor either
    stray = job("3", placement=None)
    assert where(snap(stray, load=loads(0, 0, 2))) == [("min_instances", "guaranteed")]


def test_scale_down_keeps_the_floor_and_stops_burst_instances() -> None:
    floor = job("1", placement="guaranteed", time_left=100)  # least time left: first victim
    bursts = [job(str(n), placement="burst", time_left=3000) for n in (2, 3)]
    actions = decide(snap(floor, *bursts), NOW).actions
    assert actions == (Drain("llm", "2", "scale down"), Drain("llm", "3", "scale down"))


def test_a_pending_job_moves_once_to_a_placement_predicted_much_sooner() -> None:
    late = pending("1", "guaranteed", NOW + 3600)
    early = starts(guaranteed=NOW + 3600, reserved=NOW + 60, burst=NOW)
    actions = decide(snap(late, placement_starts=early), NOW).actions
    assert [type(a).__name__ for a in actions] == ["Submit", "Cancel"]
    submit, cancel = actions
    assert isinstance(submit, Submit) and isinstance(cancel, Cancel)
    assert (submit.placement, submit.moves, cancel.job_id) == ("reserved", "1", "1")
    assert "3540s sooner" in submit.reason
    # the job it became is never moved again (no ping-pong)
    moved = replace(late, moved_from="0")
    assert decide(snap(moved, placement_starts=early), NOW).actions == ()


def test_a_pending_job_stays_when_the_gain_is_small_or_unknown() -> None:
    close = pending("1", "guaranteed", NOW + 250)
    early = starts(reserved=NOW, burst=NOW)
    assert decide(snap(close, placement_starts=early), NOW).actions == ()  # 250 s < 300 s
    unknown = pending("1", "guaranteed", None)
    assert decide(snap(unknown, placement_starts=early), NOW).actions == ()  # no estimate


def test_a_pending_job_is_not_moved_on_a_prediction_made_before_it_was_queued() -> None:
    late = pending("1", "guaranteed", NOW + 3600)  # first seen NOW - 5
    stale = tuple(replace(entry, observed_at=NOW - 60) for entry in starts(reserved=NOW))
    assert decide(snap(late, placement_starts=stale), NOW).actions == ()
    fresh = tuple(replace(entry, observed_at=NOW - 1) for entry in stale)
    (submit,) = [
        a for a in decide(snap(late, placement_starts=fresh), NOW).actions if isinstance(a, Submit)
    ]
    assert (submit.placement, submit.moves) == ("reserved", "1")


def test_a_burst_pending_job_may_move_to_a_preemptible_placement() -> None:
    floor = job("1", placement="guaranteed")
    extra = pending("2", "reserved", NOW + 4000)
    early = starts(burst=NOW + 5, guaranteed=NOW + 3000, reserved=NOW + 4000)
    actions = decide(snap(floor, extra, load=loads(0, 0, 4), placement_starts=early), NOW)
    (submit,) = [action for action in actions.actions if isinstance(action, Submit)]
    assert (submit.placement, submit.moves) == ("burst", "2")


def test_a_move_that_would_exceed_max_total_gpus_is_not_made() -> None:
    late = pending("1", "guaranteed", NOW + 3600)
    early = starts(reserved=NOW)
    actions = decide(snap(late, placement_starts=early, max_total_gpus=1), NOW).actions
    assert actions == ()  # the pending job keeps its place, and no warning: nothing is missing


def test_renewal_follows_the_limit_slurm_granted_not_the_configured_one() -> None:
    # time_limit 1 h, but backfill granted 20 min (--time-min): 50 s left of it now
    config = placed(resources={"time_limit": "1:00:00", "time_min": "15:00"})
    short = job("1", placement="guaranteed", time_left=50)
    assert where(snap(short, config=config)) == [("renewal", "guaranteed")]


def test_renewal_of_a_burst_job_may_stay_preemptible() -> None:
    floor = job("1", placement="guaranteed")
    burst = job("2", placement="burst", time_left=30)
    got = where(snap(floor, burst, load=loads(0, 0, 4), placement_starts=starts(burst=NOW)))
    assert got == [("renewal", "burst")]


def test_a_job_is_attributed_to_its_placement_from_what_slurm_lists() -> None:
    config = placed()

    def info(partition: str, qos: str = "", reservation: str = "") -> JobInfo:
        return JobInfo("1", "llm", "RUNNING", 60, 60, 0, 0, (), "", partition, qos, reservation)

    assert placement_of(config, info("gpu", "normal")) == "guaranteed"
    assert placement_of(config, info("scavenger", "normal")) == "burst"
    assert placement_of(config, info("gpu", "normal", "floor")) == "reserved"  # most specific
    assert placement_of(config, info("other", "normal")) is None
    assert placement_of(service(), info("")) == ""  # no placements: the one default


def test_slurm_is_asked_where_only_when_a_job_may_be_submitted_or_moved() -> None:
    def may(*jobs: JobView, config: ServiceConfig | None = None, **fields: Any) -> bool:
        one = ServiceSnapshot(config=config or placed(), jobs=jobs, **fields)
        return may_submit(one, NOW, horizon=60)

    floor = job("1", placement="guaranteed", time_left=3000)
    assert not may(floor)  # steady: nothing to place
    assert may()  # the floor is short
    assert may(floor, load=loads(0, 0, 4))  # the load wants more
    assert may(job("1", placement="guaranteed", time_left=100))  # renewal within 60 + 60 s
    assert may(floor, pending("2", "reserved"))  # a pending job may be moved
    assert not may(floor, replace(pending("2", "reserved"), moved_from="0"))  # not twice
    assert not may(config=service())  # one placement: no choice to make
