"""Placements and --time-min on the real sandbox cluster (marker slurm): the agent asks
`sbatch --test-only` per placement, submits where a start is predicted (a placement Slurm
refuses ranks after it), reads the job's partition back from squeue and so knows its
placement; backfill grants a job with --time-min a shorter limit, which squeue reports."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from hpc.config import AgentConfig, ServiceConfig, parse_config
from hpc.jobs.script import sbatch_lines
from hpc.jobs.slurm import SlurmJobSystem
from hpc.jobs.system import JobInfo, JobTag, Submission, private_dir
from hpc.registry import BackendRegistry
from hpc.scheduler.agent import Agent
from hpc.scheduler.placement import floor_count, placement_of
from hpc.scheduler.placement_probes import placed_submission
from hpc.scheduler.policy import JobView, ServiceSnapshot
from hpc.scheduler.state import AgentState
from saia.sandbox.slurm import SlurmSandbox
from saia.sandbox.slurm_conf import BURST

pytestmark = pytest.mark.slurm
SERVICE = "svc"


def settings(slurm_cluster: SlurmSandbox, state_dir: Path, prefix: str, **service: Any) -> Any:
    return {
        "state_dir": str(state_dir),
        "slurm_conf": str(slurm_cluster.slurm_conf),
        "slurm_bin_dir": str(slurm_cluster.bin_dir),
        "slurm_timeout": 15,
        "job_prefix": prefix,
        "services": [{"name": SERVICE, "model": "x", "template": "standin", **service}],
    }


def sleeper(service: ServiceConfig, config: AgentConfig, tag: JobTag) -> Submission:
    """The agent's real #SBATCH lines (partition, --time, --time-min...) over a sleep."""
    script = "\n".join(["#!/bin/bash", *sbatch_lines(service, config, tag), "exec sleep 600"])
    log_path = config.state_dir / "jobs" / "%j.log"
    return Submission(SERVICE, script + "\n", tag.job_name(SERVICE), tag.comment, log_path, {})


async def test_the_agent_submits_where_slurm_predicts_a_start_and_knows_it_after(
    slurm_cluster: SlurmSandbox, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="hpc")
    state_dir = private_dir(tmp_path / "state")
    prefix = "p" + uuid.uuid4().hex[:8]
    resources = {"cpus": 1, "memory": "100M", "time_limit": "30:00", "time_min": "15:00"}
    placements = [{"name": "nowhere", "partition": "nosuch"}, {"name": "main", "partition": "gpu"}]
    config = parse_config(
        settings(slurm_cluster, state_dir, prefix, resources=resources, placements=placements)
    )
    tag = JobTag(prefix, "placed")
    jobs = SlurmJobSystem(config, tag)
    agent = Agent(
        config, jobs, BackendRegistry(), AgentState("placed"), lambda s: sleeper(s, config, tag)
    )
    try:
        assert await agent.step() is True
        # sbatch --test-only refused the unknown partition: logged, ranked after "main"
        assert "nowhere: sbatch: invalid partition" in caplog.text.lower().replace("error: ", "")
        [info] = await jobs.list_jobs()
        assert info.partition == "gpu"
        # a fresh agent (no saved state) attributes the job from squeue alone
        fresh = Agent(config, jobs, BackendRegistry(), AgentState("placed"), agent.render)
        [view] = fresh.observe([info], time.time()).services[0].jobs
        assert view.placement == "main"
        assert info.time_limit_s is not None and 900 <= info.time_limit_s <= 1800
    finally:
        slurm_cluster.run(["scancel", f"--name={prefix}-{SERVICE}"])
        await jobs.aclose()


async def test_backfill_grants_a_job_with_time_min_a_shorter_limit(
    slurm_cluster: SlurmSandbox, tmp_path: Path
) -> None:
    """A holds half the node for 10 min; B (whole node) waits for it; C (half the node,
    1 h, --time-min 2 min) fits before B's planned start only with a shorter limit, which
    backfill grants: squeue lists C running with less than its 1 h."""
    state_dir = private_dir(tmp_path / "state")
    prefix = "t" + uuid.uuid4().hex[:8]
    tag = JobTag(prefix, "timemin")
    config = parse_config(settings(slurm_cluster, state_dir, prefix))
    jobs = SlurmJobSystem(config, tag)

    def job(cpus: int, limit: str, time_min: str | None = None) -> Submission:
        res = {"cpus": cpus, "gpus": 0, "memory": "100M", "time_limit": limit}
        data = settings(slurm_cluster, state_dir, prefix, renewal_lead=30, resources=res)
        if time_min:
            data["services"][0]["resources"]["time_min"] = time_min
        placed = parse_config(data)
        return sleeper(placed.services[0], placed, tag)

    try:
        first = await jobs.submit(job(4, "10:00"))
        await until_state(jobs, first, "RUNNING")
        await jobs.submit(job(8, "5:00"))  # waits for the first to end
        short = await jobs.submit(job(4, "1:00:00", time_min="2:00"))
        info = await until_state(jobs, short, "RUNNING")
        assert info.time_limit_s is not None
        assert 120 <= info.time_limit_s < 3600  # granted: up to the whole-node job's start
        assert info.time_left_s is not None and info.time_left_s <= info.time_limit_s
    finally:
        slurm_cluster.run(["scancel", f"--name={prefix}-{SERVICE}"])
        await jobs.aclose()


async def until_state(jobs: SlurmJobSystem, job_id: str, state: str) -> JobInfo:
    """Poll squeue (bounded: 60 s; backfill runs every second on the sandbox)."""
    deadline = time.monotonic() + 60
    while True:
        found = {info.job_id: info for info in await jobs.list_jobs()}
        info = found.get(job_id)
        if info is not None and info.state == state:
            return info
        assert time.monotonic() < deadline, f"job {job_id}: {info}"
        await asyncio.sleep(0.5)


async def test_each_partition_answers_test_only_and_a_burst_job_is_known_as_burst(
    slurm_cluster: SlurmSandbox, tmp_path: Path
) -> None:
    """Two real partitions (`gpu`, and the sandbox's preemptible `burst`): sbatch --test-only
    gives a start for each, and a job placed in `burst` is listed there and counted as
    preemptible (it holds no floor)."""
    state_dir = private_dir(tmp_path / "state")
    prefix = "b" + uuid.uuid4().hex[:8]
    resources = {"cpus": 1, "memory": "100M", "time_limit": "30:00"}
    placements = [
        {"name": "floor", "partition": "gpu"},
        {"name": "burst", "partition": BURST, "preemptible": True},
    ]
    config = parse_config(
        settings(slurm_cluster, state_dir, prefix, resources=resources, placements=placements)
    )
    tag = JobTag(prefix, "burst")
    jobs = SlurmJobSystem(config, tag)
    service = config.services[0]

    def render(placed: ServiceConfig) -> Submission:
        return sleeper(placed, config, tag)

    try:
        before = time.time()
        for name, partition in (("floor", "gpu"), ("burst", BURST)):
            estimate = await jobs.test_start(placed_submission(render, service, name))
            assert estimate.partition == partition
            assert before - 60 <= estimate.start <= before + 60  # idle: now
        job_id = await jobs.submit(placed_submission(render, service, "burst"))
        [info] = [info for info in await jobs.list_jobs() if info.job_id == job_id]
        assert info.partition == BURST and placement_of(service, info) == "burst"
        snapshot = ServiceSnapshot(service, jobs=(JobView(info, first_seen=before),))
        assert floor_count(snapshot, snapshot.jobs) == 0  # the floor is still to be placed
    finally:
        slurm_cluster.run(["scancel", f"--name={prefix}-{SERVICE}"])
        await jobs.aclose()
