"""The agent prunes `<state_dir>/jobs/` on a real temporary state dir, with the in-memory
job system (tests/hpc/fakes.py) standing in for Slurm."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from hpc.scheduler import job_pruning
from tests.hpc.scheduler.test_agent_loop import Rig, rig, service

DAY = 86400.0


def make_job(jobs: Path, job_id: str, age_s: float, cache: bool = True) -> Path:
    """A job's folder (key, endpoint, compile cache) and flat log, last written age_s ago."""
    folder = jobs / job_id
    (folder / "tls").mkdir(parents=True)
    (folder / "api_key").write_text("secret\n")
    (folder / "tls" / "key.pem").write_text("key\n")
    if cache:
        (folder / "vllm-cache" / "torch_compile").mkdir(parents=True)
        (folder / "vllm-cache" / "torch_compile" / "graph.bin").write_bytes(b"x" * 4096)
    (jobs / f"{job_id}.log").write_text("INFO: serving\n")
    os.symlink(f"../{job_id}.log", folder / "job.log")
    age(folder, age_s)
    age(jobs / f"{job_id}.log", age_s)
    return folder


def present(path: Path) -> bool:
    """The entry exists, a link counted as itself (not followed)."""
    return os.path.lexists(path)


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then), follow_symlinks=False)


async def adopted(tmp_path: Path, *running: str) -> Rig:
    r = rig(tmp_path, service(min_instances=0))  # no job but the test's
    for job_id in running:
        r.slurm.add(job_id, "tiny", running=True)
    await r.step()  # the agent adopts them
    assert set(r.agent.live.jobs) == set(running)
    r.clock.now = time.time()  # the files' ages are real
    return r


async def test_old_folders_and_logs_go_current_ones_stay_and_links_are_not_followed(
    tmp_path: Path,
) -> None:
    r = await adopted(tmp_path, "2001")
    jobs = r.state_dir / "jobs"
    outside = tmp_path / "outside"
    (outside / "precious").mkdir(parents=True)
    (outside / "precious" / "data").write_text("keep me\n")
    running = make_job(jobs, "2001", 30 * DAY)  # runs a month: quiet, but Slurm lists it
    listed = make_job(jobs, "2002", 30 * DAY)  # Slurm lists it; the agent adopts it later
    r.slurm.add("2002", "tiny", running=True)
    old = make_job(jobs, "1500", 8 * DAY)
    os.symlink(outside, old / "escape")  # planted inside a folder that goes
    age(old, 8 * DAY)
    ended = make_job(jobs, "1600", DAY)  # ended yesterday: only its cache goes
    fresh = make_job(jobs, "1700", 60)  # ended a minute ago: all stays
    os.symlink(outside, jobs / "1400")  # a planted link in place of a folder
    age(jobs / "1400", 30 * DAY)
    (jobs / "notes.txt").write_text("not a job\n")
    age(jobs / "notes.txt", 30 * DAY)

    assert await r.agent.folders.prune_once()

    for kept in (running, listed):
        assert (kept / "vllm-cache" / "torch_compile" / "graph.bin").is_file()
        assert (kept / "job.log").read_text() == "INFO: serving\n"
    assert not old.exists() and not (jobs / "1500.log").exists()
    assert not (ended / "vllm-cache").exists()
    assert (ended / "api_key").is_file() and (jobs / "1600.log").is_file()
    assert (fresh / "vllm-cache").is_dir() and (jobs / "1700.log").is_file()
    assert not present(jobs / "1400")  # the link is gone ...
    assert (outside / "precious" / "data").read_text() == "keep me\n"  # ... its target stays
    assert (jobs / "notes.txt").is_file()
    assert r.agent.folders.removed == 4 and r.agent.folders.error == ""
    await r.step()
    assert r.status().error == ""


async def test_a_cache_link_out_of_the_folder_is_removed_as_a_link(tmp_path: Path) -> None:
    r = await adopted(tmp_path)
    jobs = r.state_dir / "jobs"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "data").write_text("keep me\n")
    folder = make_job(jobs, "1600", DAY, cache=False)
    os.symlink(outside, folder / "vllm-cache")
    age(folder, DAY)
    assert await r.agent.folders.prune_once()
    assert not present(folder / "vllm-cache") and (folder / "api_key").is_file()
    assert (outside / "data").read_text() == "keep me\n"


async def test_nothing_goes_while_the_job_list_cannot_be_read(tmp_path: Path) -> None:
    r = await adopted(tmp_path)
    old = make_job(r.state_dir / "jobs", "1500", 30 * DAY)
    r.slurm.fail_list = RuntimeError("squeue: timed out")
    assert not await r.agent.folders.prune_once()
    assert (old / "vllm-cache").is_dir()


async def test_a_failed_round_is_logged_once_shown_in_status_and_clears(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    r = await adopted(tmp_path)
    jobs = r.state_dir / "jobs"
    make_job(jobs, "1500", 30 * DAY)
    make_job(jobs, "1501", 30 * DAY)
    monkeypatch.setattr(job_pruning, "ROUND_BUDGET", 0.0)  # no time for any rm
    with caplog.at_level(logging.WARNING, logger=job_pruning.__name__):
        assert await r.agent.folders.prune_once()
        assert await r.agent.folders.prune_once()
    assert len([m for m in caplog.messages if "cannot prune" in m]) == 1
    await r.step()
    assert "cannot prune" in r.status().error and "took over 0 s" in r.status().error
    monkeypatch.setattr(job_pruning, "ROUND_BUDGET", 60.0)
    assert await r.agent.folders.prune_once()
    assert not (jobs / "1500").exists() and not (jobs / "1501").exists()
    await r.step()
    assert r.status().error == ""
