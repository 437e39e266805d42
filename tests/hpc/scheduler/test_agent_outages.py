"""Outages seen by the agent loop (fast, on the in-memory job system): Slurm not
answering, the state file not writable. Each is logged once when it starts and once when
it ends, shown in status meanwhile, and the agent serves throughout. The real ones are
tests/faults/test_slurmctld_down.py and tests/faults/test_disk_full.py."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import pytest

from hpc.scheduler.status import read_status
from tests.hpc.scheduler.test_agent_loop import rig


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


async def test_a_failing_state_write_is_logged_once_and_shown_in_status(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The state file cannot be written (a full disk, a quota): the agent serves on, logs
    it once, and shows it in the status file (small, and written separately)."""
    caplog.set_level(logging.INFO, logger="hpc")
    r = rig(tmp_path)
    await r.step()
    [job] = r.slurm.live(r.agent.config.services[0].name)
    await r.serve(job)

    def disk_full() -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(r.agent.live, "save", disk_full)
    for _loop in range(5):
        await r.step()
        assert r.ready() == [job]
        assert "No space left on device" in read_status(r.state_dir).error
    assert caplog.text.count("cannot write the agent state") == 1
    monkeypatch.undo()
    await r.step()
    assert read_status(r.state_dir).error == ""
    assert caplog.text.count("the agent's state is written again after 5 s") == 1
