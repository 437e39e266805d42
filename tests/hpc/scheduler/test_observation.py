"""The observe step (hpc/scheduler/observation.py) over a `LiveState`: fast tests.

The job lists come from the in-memory job system (tests/hpc/fakes.py); the registry and
the health book are the real ones.
"""

from __future__ import annotations

from pathlib import Path

from hpc.config import AgentConfig, parse_config
from hpc.jobs.system import job_dir
from hpc.registry import Backend, BackendRegistry
from hpc.scheduler.backend_load import BackendLoad, LoadReading
from hpc.scheduler.health import ProbeResult
from hpc.scheduler.live import LiveState
from hpc.scheduler.observation import observe
from hpc.scheduler.policy import LostJob
from hpc.scheduler.state import AgentState, JobRecord
from tests.hpc.fakes import MemoryJobSystem

NOW = 5_000.0


def config_of(state_dir: Path) -> AgentConfig:
    service = {"name": "llm", "model": "m", "look_back": 10, "scale_down_delay": 20}
    return parse_config({"state_dir": str(state_dir), "services": [service]})


async def test_a_job_list_becomes_the_policys_snapshot(tmp_path: Path) -> None:
    saved = AgentState(
        "a",
        jobs={
            "1": JobRecord("llm", NOW - 900, NOW - 800, NOW - 700),
            "2": JobRecord("llm", NOW - 100, replaces="1"),
            "3": JobRecord("llm", NOW - 50, cancelled=True),
        },
    )
    live, registry = LiveState(config_of(tmp_path), saved), BackendRegistry()
    slurm = MemoryJobSystem(lambda: NOW)
    slurm.add("2", "llm", running=True)
    slurm.start("2", tmp_path, port=8002)
    slurm.add("4", "gone-service")  # ours, but its service is no longer configured
    registry.publish("llm", [Backend("llm", "2", "http://127.0.0.1:8002", in_flight=3)])
    snapshot = observe(live, registry, await slurm.list_jobs(), NOW)
    [service] = snapshot.services
    assert {lost.job_id: lost for lost in service.lost} == {
        "1": LostJob("1", was_ready=True, cancelled=False),
        "3": LostJob("3", was_ready=False, cancelled=True),
    }
    [view] = service.jobs
    assert (view.job_id, view.running_since, view.in_flight, view.replaces) == ("2", NOW, 3, None)
    assert [orphan.job_id for orphan in snapshot.orphans] == ["4"]
    assert live.jobs["4"].first_seen == NOW  # adopted
    assert live.endpoints["2"].url == "http://127.0.0.1:8002"
    assert set(live.jobs) == {"2", "4"} and "1" not in live.health.known()


async def test_endpoints_are_read_only_from_running_jobs_and_only_when_valid(
    tmp_path: Path,
) -> None:
    live, registry = LiveState(config_of(tmp_path), AgentState("a")), BackendRegistry()
    slurm = MemoryJobSystem(lambda: NOW)
    slurm.add("5", "llm")  # pending: an endpoint file of it is not looked at
    slurm.start("5", tmp_path)
    slurm.jobs["5"].state = "PENDING"
    slurm.add("6", "llm", running=True)
    folder = job_dir(tmp_path, "6")
    folder.mkdir(parents=True)
    (folder / "endpoint.json").write_text("{half a file")
    observe(live, registry, await slurm.list_jobs(), NOW)
    assert dict(live.endpoints) == {}
    slurm.start("6", tmp_path, port=8006)  # now written whole (atomically, 0600)
    observe(live, registry, await slurm.list_jobs(), NOW + 1)
    assert list(live.endpoints) == ["6"] and live.endpoints["6"].port == 8006


async def test_load_samples_take_the_router_and_the_backends_and_keep_the_window(
    tmp_path: Path,
) -> None:
    live, registry = LiveState(config_of(tmp_path), AgentState("a")), BackendRegistry()
    slurm = MemoryJobSystem(lambda: NOW)
    slurm.add("7", "llm", running=True)
    observe(live, registry, await slurm.list_jobs(), NOW)
    live.health.record(ProbeResult("7", ok=True), NOW)
    live.health.record_load(LoadReading("7", BackendLoad(running=2, waiting=5)))
    registry.publish("llm", [Backend("llm", "7", "http://127.0.0.1:1", in_flight=4)])
    snapshot = observe(live, registry, await slurm.list_jobs(), NOW + 10)
    sample = snapshot.services[0].load[-1]
    assert (sample.routed, sample.in_backends, sample.load) == (4, 7, 7)
    # look_back 10 s + scale_down_delay 20 s: older samples are dropped
    later = observe(live, registry, await slurm.list_jobs(), NOW + 35)
    assert [s.at for s in later.services[0].load] == [NOW + 10, NOW + 35]
