"""Preemption on the real sandbox cluster, the agent in-process (issue 12).

With PreemptMode=REQUEUE Slurm would put a preempted job back in the queue under the same
id, held for minutes; saia's jobs are submitted with --no-requeue, so Slurm cancels them
instead, and the agent replaces them at once. A job requeued anyway (an admin's
`scontrol requeue`) is cancelled by the agent and replaced by a fresh one. The same under
load through the whole chain: tests/faults/test_preemption.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hpc.jobs.system import job_dir
from hpc.scheduler.observation import STOPPING_FILE
from hpc.scheduler.status import read_status
from saia.sandbox.slurm import SlurmSandbox
from saia.sandbox.slurm_conf import BURST, BURST_REQUEUE, GPUS, URGENT
from tests.hpc.scheduler.test_agent_slurm import (
    STANDIN_SERVICE,
    agent_config,
    our_jobs,
    ready,
    running_agent,
    until,
)

pytestmark = pytest.mark.slurm
LIMIT = 90.0
RESOURCES = STANDIN_SERVICE["resources"] | {"partition": BURST_REQUEUE}


@pytest.fixture
def prefix(slurm_cluster: SlurmSandbox) -> Iterator[str]:
    """A job prefix of this test only; its jobs (and the urgent one) are cancelled at the end."""
    name = "p" + uuid.uuid4().hex[:8]
    yield name
    for job in ("tiny", "urgent"):
        slurm_cluster.run(["scancel", f"--name={name}-{job}"])


def slurm(cluster: SlurmSandbox, *argv: str) -> str:
    """A Slurm command that must succeed (sandbox commands are short and bounded)."""
    done = cluster.run(list(argv))
    assert done.returncode == 0, f"{argv[0]} failed: {done.stderr}"
    return done.stdout.strip()


def submit_urgent(cluster: SlurmSandbox, prefix: str) -> str:
    """Someone else's job in the high tier that needs every GPU of the node."""
    return slurm(
        cluster, "sbatch", "--parsable", f"--partition={URGENT}", f"--gres=gpu:{GPUS}",
        "--cpus-per-task=1", "--mem=64M", "--time=5:00", f"--job-name={prefix}-urgent",
        "--output=/dev/null", "--wrap", "sleep 300",
    ).split(";")[0]  # fmt: skip


async def test_preemption_with_requeue_mode_cancels_and_replaces_our_job(
    slurm_cluster: SlurmSandbox, prefix: str, tmp_path: Path
) -> None:
    config = agent_config(slurm_cluster, tmp_path, prefix, resources=RESOURCES)
    urgent = None
    async with running_agent(config) as registry:
        try:
            [backend] = await until(lambda: ready(registry), LIMIT, "no backend became ready")
            first = backend.job_id
            urgent = submit_urgent(slurm_cluster, prefix)
            marker = job_dir(tmp_path, first) / STOPPING_FILE
            await until(marker.exists, LIMIT, "the preempted job's shell got no SIGTERM")
            states: set[str] = set()

            async def replaced() -> bool:
                jobs = await our_jobs(config)
                states.update(j.state for j in jobs if j.job_id == first)
                return any(j.job_id != first for j in jobs) and first not in {
                    j.job_id for j in jobs
                }

            await _poll(replaced, "the preempted job was not replaced")
            assert "PENDING" not in states, "Slurm requeued the job (it has --no-requeue)"
            warnings = [w for s in read_status(tmp_path).services for w in s.warnings]
            assert not any("failed start" in w for w in warnings), warnings
            slurm(slurm_cluster, "scancel", urgent)
            await until(
                lambda: [b for b in ready(registry) if b.job_id != first], LIMIT, "no replacement"
            )
        finally:
            if urgent is not None:
                slurm_cluster.run(["scancel", urgent])


async def test_a_job_preempted_while_loading_is_replaced_without_back_off(
    slurm_cluster: SlurmSandbox, prefix: str, tmp_path: Path
) -> None:
    """Preemption is no failed start: with startup_backoff 600 s, a failed start would
    hold the replacement back for ten minutes; a preempted one is submitted at once."""
    config = agent_config(
        slurm_cluster, tmp_path, prefix,
        resources=STANDIN_SERVICE["resources"] | {"partition": BURST},
        server_command=["bash", "-c", "exec sleep 600", "loads-forever"],
        startup_timeout="10m", startup_backoff="10m", startup_backoff_max="10m",
    )  # fmt: skip
    urgent = None
    async with running_agent(config):
        try:

            async def loading() -> str | None:
                return next((j.job_id for j in await our_jobs(config) if j.running), None)

            first = await _value(loading, "the job did not start")
            urgent = submit_urgent(slurm_cluster, prefix)

            async def replacement() -> str | None:
                jobs = await our_jobs(config)
                return next((j.job_id for j in jobs if j.job_id != first), None)

            await _value(replacement, "no replacement (a back-off?)")
            assert (job_dir(tmp_path, first) / STOPPING_FILE).exists()
            # once the agent has taken in the job's end, its back-off is still clear
            saved = await until(lambda: _saved_without(tmp_path, first), LIMIT, "still saved")
            assert saved is not None and saved["backoff"]["tiny"]["failures"] == 0, saved
            warnings = [w for s in read_status(tmp_path).services for w in s.warnings]
            assert not any("failed start" in w for w in warnings), warnings
        finally:
            if urgent is not None:
                slurm_cluster.run(["scancel", urgent])


async def test_a_job_requeued_after_it_ran_is_cancelled_and_replaced(
    slurm_cluster: SlurmSandbox, prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`scontrol requeue` puts it back to PENDING (Reason=BeginTime, about two minutes);
    the agent does not wait for it to run again under its old id and folder."""
    caplog.set_level(logging.INFO, logger="hpc.scheduler")
    config = agent_config(slurm_cluster, tmp_path, prefix)
    async with running_agent(config) as registry:
        [backend] = await until(lambda: ready(registry), LIMIT, "no backend became ready")
        first = backend.job_id
        # saia's jobs refuse requeueing (--no-requeue): an admin has to allow it first
        slurm(slurm_cluster, "scontrol", "update", f"JobId={first}", "Requeue=1")
        slurm(slurm_cluster, "scontrol", "requeue", first)

        async def replaced() -> bool:
            jobs = {j.job_id: j for j in await our_jobs(config)}
            return first not in jobs and len(jobs) == 1

        await _poll(replaced, "the requeued job was not cancelled and replaced")
        await until(
            lambda: [b for b in ready(registry) if b.job_id != first], LIMIT, "no replacement"
        )
        # Requeueing kills the server first: failed health checks may retire the job
        # before the agent sees it PENDING (then it is cancelled as requeued); either way
        # the agent cancels it, and it is no failed start.
        assert f"cancelling job {first} (tiny): " in caplog.text
        assert "failed start" not in caplog.text


async def _poll(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll an async check (bounded): Slurm signals nothing."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LIMIT
    while not await check():
        assert loop.time() < deadline, f"{what} within {LIMIT:.0f} s"
        await asyncio.sleep(0.2)


async def _value(check: Callable[[], Awaitable[str | None]], what: str) -> str:
    """Poll an async check (bounded) until it returns a value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LIMIT
    while (value := await check()) is None:
        assert loop.time() < deadline, f"{what} within {LIMIT:.0f} s"
        await asyncio.sleep(0.2)
    return value


def _saved_without(state_dir: Path, job_id: str) -> dict[str, Any] | None:
    """The agent's saved state once it no longer lists the job, else None."""
    try:
        saved: dict[str, Any] = json.loads((state_dir / "agent-state.json").read_text())
    except (OSError, ValueError):  # being replaced right now
        return None
    return saved if job_id not in saved["jobs"] else None
