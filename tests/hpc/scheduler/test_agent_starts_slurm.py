"""The agent's observe step reads Slurm's expected start of its pending job from the real
sandbox cluster (`squeue --start`), while another job holds the whole node."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest

from hpc.config import ServiceConfig, parse_config
from hpc.jobs.slurm import SlurmJobSystem
from hpc.jobs.system import JobTag, Submission, private_dir
from hpc.registry import BackendRegistry
from hpc.scheduler.agent import Agent
from hpc.scheduler.policy import JobView
from hpc.scheduler.state import AgentState
from saia.sandbox.slurm import SlurmSandbox

pytestmark = pytest.mark.slurm
SERVICE = "svc"


def whole_node(tag: JobTag, state_dir: Path) -> Submission:
    """A 5-minute job on all 8 CPUs of the sandbox node: a second one must wait for it."""
    script = "#!/bin/bash\n#SBATCH --time=5\n#SBATCH --cpus-per-task=8\nexec sleep 300\n"
    log_path = state_dir / "jobs" / "%j.log"
    return Submission(SERVICE, script, tag.job_name(SERVICE), tag.comment, log_path, {})


async def test_the_agent_sees_when_slurm_expects_its_pending_job_to_start(
    slurm_cluster: SlurmSandbox, tmp_path: Path
) -> None:
    state_dir = private_dir(tmp_path / "state")
    prefix = "s" + uuid.uuid4().hex[:8]
    settings = {
        "state_dir": str(state_dir),
        "slurm_conf": str(slurm_cluster.slurm_conf),
        "slurm_bin_dir": str(slurm_cluster.bin_dir),
        "slurm_timeout": 15,
        "job_prefix": prefix,
        "services": [{"name": SERVICE, "model": "x", "template": "standin"}],
    }
    config = parse_config(settings)
    tag = JobTag(prefix, "starts")
    jobs = SlurmJobSystem(config, tag)
    other_tag = JobTag(prefix, "someone-else")  # not the agent's: never adopted
    other = SlurmJobSystem(config, other_tag)

    def render(service: ServiceConfig) -> Submission:
        return whole_node(tag, state_dir)

    agent = Agent(config, jobs, BackendRegistry(), AgentState(agent_id="starts"), render)
    try:
        before = time.time()
        await other.submit(whole_node(other_tag, state_dir))
        assert await agent.step() is True  # submits its one instance, which must wait
        view = await pending_view_with_estimate(agent, limit_s=30)
        assert view.expected_start is not None
        assert view.expected_start >= before + 200  # after the other job's 5-minute limit
    finally:
        slurm_cluster.run(["scancel", f"--name={prefix}-{SERVICE}"])
        await jobs.aclose()
        await other.aclose()


async def pending_view_with_estimate(agent: Agent, limit_s: float) -> JobView:
    """Loop until the pending job's view carries Slurm's estimate (the backfill scheduler
    plans it within a few seconds on the sandbox: bf_interval=1)."""
    deadline = time.monotonic() + limit_s
    while True:
        await agent.step()
        infos = await agent.jobs.list_jobs()
        [view] = agent.observe(infos, time.time()).services[0].jobs
        assert view.info.state == "PENDING"
        if view.expected_start is not None or time.monotonic() > deadline:
            return view
        await asyncio.sleep(1)
