"""The agent prunes an ended job's folder and log on the real sandbox Slurm cluster, and
keeps the running job's (hpc/scheduler/job_pruning.py)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpc.config import parse_config
from hpc.registry import Backend
from hpc.scheduler import job_pruning
from saia.sandbox.slurm import SlurmSandbox
from tests.hpc.scheduler.test_agent_slurm import (
    SERVICE,
    STANDIN_SERVICE,
    cluster_settings,
    our_jobs,
    ready,
    running_agent,
    until,
)

pytestmark = pytest.mark.slurm


@pytest.fixture
def prefix(slurm_cluster: SlurmSandbox) -> Iterator[str]:
    name = "p" + os.urandom(4).hex()
    yield name
    slurm_cluster.run(["scancel", f"--name={name}-{SERVICE}"])


def gone(path: Path) -> bool:
    return not os.path.lexists(path)


async def test_an_ended_jobs_folder_and_log_go_after_the_retention_a_running_ones_stay(
    slurm_cluster: SlurmSandbox, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(job_pruning, "PRUNE_INTERVAL", 0.5)  # hourly in production
    settings = cluster_settings(slurm_cluster, tmp_path, prefix) | {"job_retention": "3s"}
    service = STANDIN_SERVICE | {"name": SERVICE, "model": "tiny"}
    config = parse_config(settings | {"services": [service]})
    jobs = tmp_path / "jobs"
    async with running_agent(config) as registry:
        first = (await until(lambda: ready(registry), 90, "not ready"))[0].job_id
        assert (jobs / first / "endpoint.json").is_file() and (jobs / f"{first}.log").is_file()
        assert slurm_cluster.run(["scancel", first]).returncode == 0  # the job ends

        def replaced() -> list[Backend]:
            return [b for b in ready(registry) if b.job_id != first]

        second = (await until(replaced, 90, "no replacement became ready"))[0].job_id
        await until(lambda: gone(jobs / first) and gone(jobs / f"{first}.log"), 60, "not pruned")
        # the running job's files stay however quiet its log: Slurm lists it. A day-old
        # log of it, and a day-old log of no job: once that one is gone, a round has run.
        for path in (jobs / second, jobs / f"{second}.log", jobs / "999999.log"):
            path.touch()
            os.utime(path, (time.time() - 86400,) * 2, follow_symlinks=False)
        await until(lambda: gone(jobs / "999999.log"), 30, "no round after the touch")
        assert (jobs / second / "endpoint.json").is_file() and (jobs / f"{second}.log").is_file()
        assert second in [j.job_id for j in await our_jobs(config)]
