"""A Slurm outage seen by the agent loop (fast, on the in-memory job system): logged once
when it starts and once when it ends, shown in status meanwhile, serving throughout.
The real outage (slurmctld stopped) is tests/faults/test_outages.py."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.hpc.test_agent_loop import rig


async def test_a_slurm_outage_is_logged_once_and_its_end_too(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hpc")
    r = rig(tmp_path)
    await r.step()
    [job] = r.slurm.live(r.agent.config.services[0].name)
    await r.serve(job)
    r.slurm.fail_list = RuntimeError("squeue: error: Unable to contact slurm controller")
    for _loop in range(5):
        assert await r.step() is False
        assert r.status().error.startswith("cannot list jobs: squeue: error: Unable")
        assert r.ready() == [job]  # still serving
    assert caplog.text.count("cannot list jobs") == 1
    r.slurm.fail_list = None
    await r.step()
    assert r.status().error == "" and r.ready() == [job]
    assert caplog.text.count("Slurm answers again after 5 s") == 1
    assert caplog.text.count("cannot list jobs") == 1
    r.slurm.fail_list = RuntimeError("squeue: timed out")  # a new outage: logged again
    await r.step()
    assert caplog.text.count("cannot list jobs") == 2
