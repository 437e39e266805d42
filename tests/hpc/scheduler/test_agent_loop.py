"""The agent loop (observe -> decide -> act) on an in-memory job system: fast tests.

They drive `Agent.step()` with a test clock and play Slurm's part by hand
(`tests/hpc/fakes.py`); the prober's part is its seam, the health book. The same
behaviour on the real sandbox Slurm cluster is in test_agent_slurm.py and
test_agent_operations.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hpc.config import AgentConfig, load_config, parse_config
from hpc.jobs.system import Submission
from hpc.registry import BackendRegistry
from hpc.scheduler.agent import Agent
from hpc.scheduler.backend_load import BackendLoad, LoadReading
from hpc.scheduler.health import ProbeResult
from hpc.scheduler.operator_requests import DrainRequest, write_drain, write_reload
from hpc.scheduler.state import AgentState, JobRecord
from hpc.scheduler.status import AgentStatus, read_status, serving
from tests.hpc.fakes import MemoryJobSystem
from tests.hpc.helpers import until

SERVICE = "tiny"
START = 10_000.0


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


def service(**overrides: Any) -> dict[str, Any]:
    base = {
        "name": SERVICE,
        "model": "tiny",
        "template": "standin",
        "min_instances": 1,
        "max_instances": 1,
        "renewal_lead": 60,
        "scale_down_delay": 0,
        "look_back": 0,
        "startup_backoff": 30,
        "resources": {"gpus": 1, "time_limit": "10:00"},
    }
    return base | overrides


def settings(state_dir: Path, *services: dict[str, Any]) -> dict[str, Any]:
    return {"state_dir": str(state_dir), "poll_interval": 0.05, "services": list(services)}


def render(service: Any) -> Submission:
    return Submission(service.name, "#!/bin/sh\n", f"saia-{service.name}", "c", Path("x"), {})


@dataclass
class Rig:
    agent: Agent
    slurm: MemoryJobSystem
    clock: Clock
    registry: BackendRegistry
    state_dir: Path

    async def step(self, seconds: float = 1.0) -> bool:
        self.clock.now += seconds
        return await self.agent.step()

    async def serve(self, job_id: str) -> None:
        """The job runs, writes its endpoint, and passes its first health check."""
        self.slurm.start(job_id, self.state_dir)
        await self.step()  # the agent reads endpoint.json
        assert job_id in self.agent.live.endpoints
        self.agent.live.health.record(ProbeResult(job_id, ok=True), self.clock())
        await self.step()

    def ready(self) -> list[str]:
        return sorted(backend.job_id for backend in self.registry.ready(SERVICE))

    def status(self) -> AgentStatus:
        return read_status(self.state_dir)

    def jobs(self) -> dict[str, JobRecord]:
        return dict(self.agent.live.jobs)


def rig(
    tmp_path: Path,
    *services: dict[str, Any],
    state: AgentState | None = None,
    config_path: Path | None = None,
) -> Rig:
    state_dir = tmp_path / "state"
    config: AgentConfig = (
        load_config(config_path)
        if config_path
        else parse_config(settings(state_dir, *(services or (service(),))))
    )
    clock, registry = Clock(), BackendRegistry()
    slurm = MemoryJobSystem(clock, time_limit_s=600)
    saved = state or AgentState(agent_id="test")
    agent = Agent(config, slurm, registry, saved, render, clock, config_path=config_path)
    return Rig(agent, slurm, clock, registry, config.state_dir)


async def test_jobs_left_by_an_earlier_agent_are_adopted_and_serve_at_once(
    tmp_path: Path,
) -> None:
    """A restart never interrupts serving: a job the saved state knows as ready is in
    rotation at the first loop; an unknown one of ours is adopted as starting."""
    saved = AgentState("test", jobs={"7": JobRecord(SERVICE, START - 200, START - 150, START)})
    r = rig(tmp_path, service(min_instances=2, max_instances=2), state=saved)
    r.slurm.add("7", SERVICE, running=True)
    r.slurm.start("7", r.state_dir)
    r.slurm.add("8", SERVICE)
    assert await r.step() is False
    assert r.slurm.submissions == [] and r.slurm.cancelled == []
    assert set(r.jobs()) == {"7", "8"} and r.jobs()["8"].first_seen == START
    assert r.ready() == ["7"] and r.registry.starting(SERVICE) == 1
    jobs = {j.job_id: serving(j) for j in r.status().jobs}
    assert jobs == {"7": "ready", "8": "pending"}


async def test_scale_from_zero_on_demand_then_up_by_load(tmp_path: Path) -> None:
    r = rig(tmp_path, service(min_instances=0, max_instances=3, target_concurrency=4))
    assert await r.step() is False and r.slurm.submissions == []
    r.registry.note_demand(SERVICE, time.monotonic())  # a request found no backend
    assert await r.step() is True
    [first] = r.slurm.live(SERVICE)
    assert r.registry.starting(SERVICE) == 1  # the router reports the service "loading"
    await r.serve(first)
    assert r.ready() == [first] and r.registry.demand_since(SERVICE) is None
    # the backend reports 6 running + 4 waiting: ceil(10 / 4) = 3 instances wanted
    r.agent.live.health.record_load(LoadReading(first, BackendLoad(6, 4)))
    await r.step()
    assert len(r.slurm.live(SERVICE)) == 3
    assert r.status().services[0].load == 10


async def test_renewal_hands_over_before_the_time_limit(tmp_path: Path) -> None:
    """The replacement is submitted renewal_lead before the limit; the old job drains
    once the new one serves and is cancelled only when its last request is done."""
    r = rig(tmp_path)
    await r.step()
    [old] = r.slurm.live(SERVICE)
    await r.serve(old)
    assert await r.step(540) is True  # 58 s left of 600: within renewal_lead (60 s)
    [new] = [j for j in r.slurm.live(SERVICE) if j != old]
    assert r.jobs()[new].replaces == old and r.ready() == [old]
    [backend] = r.registry.ready(SERVICE)
    backend.in_flight = 1  # a request still runs on the old job (the router counts it)
    await r.serve(new)
    assert r.ready() == [new] and r.jobs()[old].draining
    assert r.jobs()[old].drain_reason == f"replaced by {new}"
    await r.step()
    assert old not in r.slurm.cancelled, "cancelled with a request in flight"
    assert backend.draining
    backend.in_flight = 0
    await r.step()
    assert r.slurm.cancelled == [old]
    await r.step()
    assert set(r.jobs()) == {new} and r.jobs()[new].replaces is None
    assert len(r.slurm.submissions) == 2 and r.ready() == [new]


async def test_operator_drain_replaces_first_and_drain_now_does_not_wait(
    tmp_path: Path,
) -> None:
    r = rig(tmp_path)
    await r.step()
    [first] = r.slurm.live(SERVICE)
    await r.serve(first)
    write_drain(r.state_dir, DrainRequest(job_id=first))
    await r.step()
    [second] = [j for j in r.slurm.live(SERVICE) if j != first]
    assert r.jobs()[second].replaces == first
    assert {j.job_id: serving(j) for j in r.status().jobs}[first] == "ready, drain requested"
    await r.serve(second)
    assert r.jobs()[first].drain_reason == f"operator: replaced by {second}"
    await r.step()
    assert r.slurm.cancelled == [first] and r.ready() == [second]
    # --now: out of rotation at once; the scaling rules submit the replacement
    write_drain(r.state_dir, DrainRequest(job_id=second, now=True))
    await r.step()
    assert r.jobs()[second].draining and r.ready() == []
    assert len(r.slurm.live(SERVICE)) == 2  # the draining job and its replacement
    await r.step()
    assert r.slurm.cancelled == [first, second]


def write_config(path: Path, *services: dict[str, Any], **top: Any) -> None:
    path.write_text(json.dumps(settings(path.parent / "state", *services) | top))


async def test_reload_adds_and_retires_services_and_a_bad_one_changes_nothing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "agent.yaml"  # JSON is YAML
    write_config(path, service())
    r = rig(tmp_path, config_path=path)
    await r.step()
    assert [s.service for s in r.slurm.submissions] == [SERVICE]
    write_config(path, service(), service(name="other", model="other"))
    write_reload(r.state_dir)
    await r.step()
    assert [s.service for s in r.slurm.submissions] == [SERVICE, "other"]
    assert r.status().reloaded_at == r.clock() and r.status().reload_error == ""
    # a key fixed for the agent's lifetime: refused, the running config stays
    write_config(path, service(), job_prefix="changed")
    r.agent.wake(reload=True)  # what SIGHUP does
    await r.step()
    status = r.status()
    assert "job_prefix: cannot change while the agent runs" in status.reload_error
    assert status.error == status.reload_error and len(status.services) == 2
    # a valid reload removing "other": its idle job is retired
    write_config(path, service())
    r.agent.wake(reload=True)
    await r.step()
    [other] = r.slurm.cancelled
    assert r.slurm.info(r.slurm.live(SERVICE)[0]).service == SERVICE
    assert other not in r.slurm.jobs and r.status().reload_error == ""


async def test_a_lost_job_is_replaced_and_a_lost_start_backs_off(tmp_path: Path) -> None:
    r = rig(tmp_path)
    await r.step()
    [first] = r.slurm.live(SERVICE)
    await r.serve(first)
    r.slurm.end(first)  # killed, node failure: gone from the queue
    await r.step()
    assert first not in r.jobs() and r.ready() == []
    assert first not in r.agent.live.endpoints
    [second] = r.slurm.live(SERVICE)  # a served job's end is no failed start
    assert r.agent.live.backoff[SERVICE].failures == 0
    r.slurm.end(second)  # gone before it ever served: a failed start
    await r.step()
    assert r.agent.live.backoff[SERVICE].failures == 1 and r.slurm.live(SERVICE) == []
    [warning] = r.status().services[0].warnings
    assert "1 failed start(s) in a row: next submission in" in warning
    await r.step(31)  # startup_backoff (30 s) later
    assert len(r.slurm.live(SERVICE)) == 1


async def test_slurm_errors_are_logged_and_shown_and_the_loop_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hpc")
    r = rig(tmp_path)
    r.slurm.fail_submit = RuntimeError("sbatch: error: Batch job submission failed")
    assert await r.step() is False
    [warning] = r.status().services[0].warnings
    assert warning == "submission failed: sbatch: error: Batch job submission failed"
    assert "submission failed: sbatch: error" in caplog.text
    r.slurm.fail_submit = None
    await r.step()  # backing off: nothing yet
    assert r.slurm.submissions == []
    await r.step(31)
    [job] = r.slurm.live(SERVICE)
    await r.serve(job)
    r.slurm.fail_list = RuntimeError("squeue: error: slurm_load_jobs: timed out")
    assert await r.step() is False
    assert r.status().error == "cannot list jobs: squeue: error: slurm_load_jobs: timed out"
    assert "cannot list jobs: squeue" in caplog.text
    assert r.ready() == [job] and set(r.jobs()) == {job}  # still serving, nothing forgotten
    r.slurm.fail_list = None
    write_drain(r.state_dir, DrainRequest(job_id=job, now=True))
    r.slurm.fail_cancel = RuntimeError("scancel: error: timed out")
    await r.step()  # drains, and submits the replacement
    await r.step()  # the cancel fails: the job stays ours, tried again
    assert r.status().error == "" and not r.jobs()[job].cancelled
    assert f"cannot cancel job {job}: scancel: error: timed out" in caplog.text
    r.slurm.fail_cancel = None
    await r.step()
    assert r.slurm.cancelled == [job]


async def test_pending_jobs_get_slurms_expected_start_once_per_loop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Only pending jobs are asked about, once per loop; a failing `squeue --start` leaves
    the estimates unknown, is logged once per outage, and the loop acts on."""
    caplog.set_level(logging.WARNING, logger="hpc")
    r = rig(tmp_path, service(min_instances=2, max_instances=2))
    assert await r.step() is True
    first, second = sorted(r.slurm.jobs)
    r.slurm.starts = {first: START + 500.0}
    r.slurm.start(second, r.state_dir)
    r.slurm.start_queries.clear()
    await r.step()
    assert r.slurm.start_queries == [[first]]  # the running job is not asked about
    views = {
        v.job_id: v for v in r.agent.observe(await r.slurm.list_jobs(), r.clock()).services[0].jobs
    }
    assert views[first].expected_start == START + 500.0
    assert views[second].expected_start is None
    r.slurm.fail_starts = RuntimeError("squeue: error: Invalid user")
    await r.step()
    await r.step()
    assert caplog.text.count("cannot read start estimates: squeue: error: Invalid user") == 1
    views = {
        v.job_id: v for v in r.agent.observe(await r.slurm.list_jobs(), r.clock()).services[0].jobs
    }
    assert views[first].expected_start is None and r.status().error == ""
    r.slurm.fail_starts = None
    await r.step()
    assert "start estimates are back" in caplog.text
    r.slurm.start(first, r.state_dir)
    r.slurm.start_queries.clear()
    await r.step()
    assert r.slurm.start_queries == []  # nothing pending: no call at all


async def test_the_predicted_wait_of_a_cold_service_is_published_for_the_router(
    tmp_path: Path,
) -> None:
    r = rig(tmp_path)
    assert await r.step() is True
    [job] = r.slurm.live(SERVICE)
    assert r.registry.predicted_wait(SERVICE, time.monotonic()) is None  # no estimate yet
    r.slurm.starts = {job: START + 500.0}
    await r.step()  # at START + 2: Slurm's start, then the default load time (180 s)
    wait = r.registry.predicted_wait(SERVICE, time.monotonic())
    assert wait is not None and 677 < wait <= 678
    await r.serve(job)
    assert r.registry.predicted_wait(SERVICE, time.monotonic()) == 0.0


async def test_the_running_loop_survives_slurm_failures(tmp_path: Path) -> None:
    """The real loop (with its prober and router tasks): a failing job list shows in
    status.json, and once Slurm answers again the agent submits its job."""
    r = rig(tmp_path)
    r.slurm.fail_list = RuntimeError("slurmctld down")
    task = asyncio.create_task(r.agent.run())
    try:
        down = "cannot list jobs: slurmctld down"
        await until(lambda: _error(r.state_dir) == down, 10, "no error in status.json")
        assert not task.done()
        r.slurm.fail_list = None
        await until(lambda: r.slurm.submissions, 10, "no submission after Slurm came back")
        await until(lambda: _error(r.state_dir) == "", 10, "the error stays")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()


def _error(state_dir: Path) -> str | None:
    try:
        return read_status(state_dir).error
    except Exception:  # not written yet, or being replaced
        return None
