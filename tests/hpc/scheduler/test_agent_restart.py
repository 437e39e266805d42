"""An agent restart keeps the load history (issue 18): instances the load of the last
minutes holds up are not drained before scale_down_delay after that load ended."""

from __future__ import annotations

from pathlib import Path

from hpc.config import parse_config
from hpc.registry import BackendRegistry
from hpc.scheduler.agent import Agent
from hpc.scheduler.backend_load import BackendLoad, LoadReading
from hpc.scheduler.state import load_state
from tests.hpc.scheduler.test_agent_loop import SERVICE, render, rig, service, settings


async def test_a_restarted_agent_holds_capacity_through_the_scale_down_delay(
    tmp_path: Path,
) -> None:
    shape = service(
        min_instances=1, max_instances=3, target_concurrency=2, look_back=20, scale_down_delay=60
    )
    r = rig(tmp_path, shape)
    await r.step()
    first = r.slurm.live(SERVICE)[0]
    await r.serve(first)
    r.agent.live.health.record_load(LoadReading(first, BackendLoad(6, 0)))  # 3 instances
    await r.step()
    for job_id in r.slurm.live(SERVICE)[1:]:
        await r.serve(job_id)
    jobs = r.slurm.live(SERVICE)
    assert len(r.ready()) == 3
    load_ended = r.clock.now  # the load stops with the old agent
    config = parse_config(settings(r.state_dir, shape))
    r.agent.live.save()  # what SIGTERM does (run_agent's shutdown)
    saved = load_state(r.state_dir, "test")
    assert len(saved.loads[SERVICE]) >= 3
    registry = BackendRegistry()
    restarted = Agent(config, r.slurm, registry, saved, render, r.clock)
    while r.clock.now < load_ended + 20 + 60 - 2:
        r.clock.now += 5
        await restarted.step()
        assert r.slurm.cancelled == [] and not any(j.draining for j in restarted.live.jobs.values())
        assert r.slurm.live(SERVICE) == jobs
    r.clock.now = load_ended + 20 + 60 + 1
    await restarted.step()
    draining = sorted(job_id for job_id, j in restarted.live.jobs.items() if j.draining)
    assert len(draining) == 2  # down to min_instances once the window passed


def test_load_samples_survive_the_state_file_and_old_files_have_none(tmp_path: Path) -> None:
    from hpc.scheduler.policy import LoadSample
    from hpc.scheduler.state import STATE_FILE, AgentState, save_state

    state = AgentState("abc", loads={"llm": [LoadSample(1.5, 3, 4), LoadSample(6.5, 0, 1)]})
    save_state(tmp_path, state)
    assert load_state(tmp_path, "abc") == state
    old = (tmp_path / STATE_FILE).read_text().replace('"loads"', '"unused"')
    assert AgentState.from_json(old).loads == {}


class Waiting:
    """The router's queue as the registry reads it (hpc/router/slots.py attaches one)."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __len__(self) -> int:
        return self.count

    def oldest_arrival(self) -> float | None:
        return 0.0 if self.count else None


def test_requests_in_the_routers_queue_are_load_that_scales_up() -> None:
    # Since the router queues requests for a backend slot, the waiting ones were missing
    # from the scaling signal: 6 clients at target_concurrency 2 never got a 2nd instance.
    import time

    from hpc.registry import BackendRegistry

    registry = BackendRegistry()
    registry.attach_queue(SERVICE, Waiting(4), lambda: None)
    assert registry.load(SERVICE, time.monotonic()).queued == 4
