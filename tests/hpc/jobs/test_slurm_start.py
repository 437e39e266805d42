"""Slurm's start estimates: `squeue --start` and `sbatch --test-only`, parsed (pure) and
read from the real sandbox cluster (marker slurm)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from hpc.config import AgentConfig
from hpc.jobs.slurm import SlurmJobSystem
from hpc.jobs.squeue import ParseError, parse_start_estimates, parse_test_only
from hpc.jobs.system import JobTag, Submission
from saia.sandbox.slurm import SlurmSandbox


def test_parse_start_estimates() -> None:
    text = "12|2024-05-01T10:00:00\n13|N/A\n\n"
    assert parse_start_estimates(text) == {"12": 1714557600.0, "13": None}
    with pytest.raises(ParseError, match="line 1"):
        parse_start_estimates("12 2024-05-01T10:00:00\n")


def test_parse_test_only() -> None:
    stderr = (
        "sbatch: Job 3 to start at 2024-05-01T10:00:00 using 8 processors on nodes "
        "gpu[01-02] in partition gpu\n"
    )
    estimate = parse_test_only(stderr)
    assert estimate.start == 1714557600.0
    assert estimate.nodes == ("gpu01", "gpu02")
    assert estimate.partition == "gpu"
    with pytest.raises(ParseError, match="Requested node configuration"):
        parse_test_only("sbatch: error: Requested node configuration is not available\n")


def submission(tag: JobTag, state_dir: Path, cpus: int) -> Submission:
    script = f"#!/bin/bash\n#SBATCH --time=5\n#SBATCH --cpus-per-task={cpus}\nexec sleep 300\n"
    return Submission(
        service="svc",
        script=script,
        job_name=tag.job_name("svc"),
        comment=tag.comment,
        log_path=state_dir / "jobs" / "%j.log",
        environment={},
    )


@pytest.mark.slurm
async def test_estimates_from_the_sandbox_cluster(
    slurm_cluster: SlurmSandbox, tmp_path: Path
) -> None:
    config = AgentConfig.model_validate(
        {
            "state_dir": tmp_path,
            "slurm_conf": slurm_cluster.slurm_conf,
            "slurm_bin_dir": slurm_cluster.bin_dir,
            "slurm_timeout": 15,
        }
    )
    tag = JobTag("est", uuid.uuid4().hex[:8])
    jobs = SlurmJobSystem(config, tag)
    whole = submission(tag, tmp_path, cpus=8)  # the sandbox node's 8 CPUs
    before = time.time()
    idle = await jobs.test_start(whole)
    assert idle.partition == "gpu"
    assert idle.nodes
    assert before - 60 <= idle.start <= before + 60  # an idle cluster starts it now
    submitted = [await jobs.submit(whole), await jobs.submit(whole)]
    try:
        busy = await jobs.test_start(whole)
        assert busy.start >= before + 200  # after the running 5-minute job's limit
        starts = await jobs.expected_starts(submitted)
        assert submitted[1] in starts  # pending: listed, with or without an estimate
        estimate = starts[submitted[1]]
        assert estimate is None or estimate >= before + 200
        assert await jobs.expected_starts([]) == {}
    finally:
        for job_id in submitted:
            await jobs.cancel(job_id)
