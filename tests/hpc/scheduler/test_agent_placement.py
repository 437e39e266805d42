"""The agent loop with candidate placements, on the in-memory job system: Slurm's
predicted start per placement (sbatch --test-only) asked in the observe step, bounded and
logged once per outage; each job submitted to its placement; a pending job moved once; a
job attributed to its placement from Slurm's listing alone (an agent restart)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from hpc.scheduler.agent import Agent
from hpc.scheduler.backend_load import BackendLoad, LoadReading
from hpc.scheduler.state import AgentState
from tests.hpc.scheduler.test_agent_loop import SERVICE, START, render, rig, service
from tests.hpc.scheduler.test_preemption import stop_signal

FLOOR = {"name": "floor", "partition": "gpu"}
BURST = {"name": "burst", "partition": "scavenger", "preemptible": True}
RESERVED = {"name": "reserved", "partition": "gpu", "reservation": "maint"}


def placed(**overrides: Any) -> dict[str, Any]:
    return service(placements=[FLOOR, BURST, RESERVED], **overrides)


def placements(r: Any) -> list[str]:
    return [submission.placement for submission in r.slurm.submissions]


async def test_each_job_goes_where_slurm_predicts_the_soonest_start(tmp_path: Path) -> None:
    r = rig(tmp_path, placed(min_instances=1, max_instances=3, target_concurrency=1))
    r.slurm.placement_starts = {"floor": START + 3600, "burst": START + 5, "reserved": START + 60}
    assert await r.step() is True
    assert r.slurm.start_tests == ["floor", "burst", "reserved"]  # one probe per placement
    assert placements(r) == ["reserved"]  # the floor never goes to the preemptible one
    [job] = r.slurm.live(SERVICE)
    assert (r.slurm.jobs[job].partition, r.slurm.jobs[job].reservation) == ("gpu", "maint")
    views = r.agent.observe(await r.slurm.list_jobs(), r.clock()).services[0].jobs
    assert [view.placement for view in views] == ["reserved"]
    await r.serve(job)
    assert [status.placement for status in r.status().jobs] == ["reserved"]  # hpc status
    # 3 requests on 1 slot each: two more instances, on burst, where they start soonest
    r.agent.live.health.record_load(LoadReading(job, BackendLoad(3, 0)))
    await r.step(seconds=61)  # the probe interval passed
    assert placements(r) == ["reserved", "burst", "burst"]


async def test_probes_are_bounded_and_a_failure_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="hpc")
    r = rig(tmp_path, placed(min_instances=2, max_instances=2))
    r.slurm.fail_test_start = RuntimeError("sbatch: error: Invalid partition name specified")
    assert await r.step() is True
    assert placements(r) == ["floor", "floor"]  # nothing known: config order
    asked = len(r.slurm.start_tests)
    for _ in range(5):  # pending jobs keep a move possible, but within the interval: no probe
        await r.step(seconds=5)
    assert len(r.slurm.start_tests) == asked
    await r.step(seconds=60)  # interval over: asked again, failing again
    assert len(r.slurm.start_tests) == 2 * asked
    assert caplog.text.count("Invalid partition name specified") == 1
    r.slurm.fail_test_start = None
    r.slurm.placement_starts = {"floor": START, "burst": START, "reserved": START}
    await r.step(seconds=60)
    assert "sbatch --test-only answers again" in caplog.text
    first, second = r.slurm.live(SERVICE)
    for job in (first, second):
        r.slurm.start(job, r.state_dir)
    r.slurm.start_tests.clear()
    await r.step(seconds=120)  # both running, nothing due: no probe at all
    assert r.slurm.start_tests == []


async def test_a_single_placement_is_never_probed(tmp_path: Path) -> None:
    r = rig(tmp_path, service(placements=[FLOOR]))
    await r.step()
    assert r.slurm.start_tests == [] and placements(r) == ["floor"]
    r2 = rig(tmp_path / "plain", service())
    await r2.step()
    assert r2.slurm.start_tests == [] and placements(r2) == [""]


async def test_a_pending_job_is_moved_once_to_a_much_sooner_placement(tmp_path: Path) -> None:
    r = rig(tmp_path, placed())
    r.slurm.placement_starts = {"floor": START, "reserved": START + 600}
    await r.step()
    [late] = r.slurm.live(SERVICE)
    r.slurm.starts = {late: START + 7200}  # squeue --start: two hours away after all
    r.slurm.placement_starts = {"floor": START + 7200, "reserved": START + 70}
    await r.step(seconds=61)
    [moved] = r.slurm.live(SERVICE)
    assert r.slurm.cancelled == [late] and placements(r) == ["floor", "reserved"]
    assert r.jobs()[moved].moved_from == late
    r.slurm.starts = {moved: START + 9000}
    r.slurm.placement_starts = {"floor": START + 100, "reserved": START + 9000}
    for _ in range(3):  # no ping-pong: the moved job stays where it is
        await r.step(seconds=61)
    assert r.slurm.live(SERVICE) == [moved] and len(r.slurm.submissions) == 2


async def test_a_failed_move_keeps_the_pending_job(tmp_path: Path) -> None:
    r = rig(tmp_path, placed())
    await r.step()
    [late] = r.slurm.live(SERVICE)
    r.slurm.starts = {late: START + 7200}
    r.slurm.placement_starts = {"floor": START + 7200, "reserved": START + 70}
    r.slurm.fail_submit = RuntimeError("sbatch: error: Socket timed out")
    await r.step(seconds=61)
    assert r.slurm.live(SERVICE) == [late] and r.slurm.cancelled == []


async def test_a_restarted_agent_knows_each_jobs_placement_from_slurm(tmp_path: Path) -> None:
    """No saved state: a job Slurm lists in the preemptible partition holds no floor."""
    r = rig(tmp_path, placed())
    r.slurm.add("7", SERVICE, running=True)
    r.slurm.jobs["7"].partition = "scavenger"
    fresh = Agent(r.agent.config, r.slurm, r.registry, AgentState("test"), render, r.clock)
    r.agent = fresh
    await r.step()
    assert placements(r) == ["floor"]  # the floor instance, beside the adopted burst one
    views = fresh.observe(await r.slurm.list_jobs(), r.clock()).services[0].jobs
    assert {view.job_id: view.placement for view in views}["7"] == "burst"


async def test_renewal_follows_the_limit_slurm_granted(tmp_path: Path) -> None:
    """time_limit 10 min, but Slurm granted 5 (--time-min): renewed 60 s before the 5."""
    r = rig(tmp_path, service(resources={"gpus": 1, "time_limit": "10:00", "time_min": "5:00"}))
    await r.step()
    [job] = r.slurm.live(SERVICE)
    r.slurm.jobs[job].time_limit_s = 300  # what backfill granted
    await r.serve(job)
    await r.step(seconds=230)  # 232 s run, 68 s left: not due yet
    assert len(r.slurm.submissions) == 1
    await r.step(seconds=10)  # 58 s left of the granted limit (358 of the configured)
    assert len(r.slurm.submissions) == 2
    assert r.jobs()[r.slurm.live(SERVICE)[-1]].replaces == job


async def test_a_preempted_burst_job_is_replaced_at_once_and_the_floor_stays(
    tmp_path: Path,
) -> None:
    """Slurm preempts the burst instance (its shell writes `stopping`): it drains, its
    replacement goes in the same loop where a start is predicted soonest, with no back-off,
    and the floor instance is untouched."""
    r = rig(tmp_path, placed(min_instances=1, max_instances=2, target_concurrency=1))
    r.slurm.placement_starts = {"floor": START, "burst": START + 600, "reserved": START + 600}
    await r.step()
    [floor] = r.slurm.live(SERVICE)
    await r.serve(floor)
    r.slurm.placement_starts = {"floor": START + 3600, "burst": START, "reserved": None}
    r.agent.live.health.record_load(LoadReading(floor, BackendLoad(2, 0)))
    await r.step(seconds=61)
    [burst] = [job for job in r.slurm.live(SERVICE) if job != floor]
    assert placements(r) == ["floor", "burst"]
    await r.serve(burst)
    r.agent.live.health.record_load(LoadReading(floor, BackendLoad(1, 0)))
    r.agent.live.health.record_load(LoadReading(burst, BackendLoad(1, 0)))
    stop_signal(r, burst)  # preempted: SIGTERM now, killed after GraceTime
    assert await r.step(seconds=61) is True
    assert r.jobs()[burst].draining and not r.jobs()[floor].draining
    assert placements(r) == ["floor", "burst", "burst"]  # the replacement, at once
    assert r.agent.live.backoff[SERVICE].failures == 0
