"""Placement probes of several services: one service's failing probe is logged once per
outage of that service, whatever the other services' probes do meanwhile."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.hpc.scheduler.test_agent_loop import START, rig, service

FLOOR = {"name": "floor", "partition": "gpu"}
BURST = {"name": "burst", "partition": "scavenger", "preemptible": True}
NOWHERE = {"name": "nowhere", "partition": "missing", "preemptible": True}


async def test_one_service_failing_is_logged_once_while_another_answers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="hpc")
    broken = service(name="broken", placements=[FLOOR, NOWHERE], min_instances=2, max_instances=2)
    fine = service(name="fine", placements=[FLOOR, BURST], min_instances=2, max_instances=2)
    r = rig(tmp_path, broken, fine)
    # "nowhere" has no estimate: the fake's sbatch --test-only fails for it, every time
    r.slurm.placement_starts = {"floor": START + 60, "burst": START + 5}
    await r.step()
    for _ in range(3):  # each interval both services are probed again (their jobs pend)
        await r.step(seconds=61)
    assert r.slurm.start_tests.count("nowhere") == 4
    assert caplog.text.count("broken: cannot predict a start") == 1
    assert "answers again" not in caplog.text  # "broken" never recovered
