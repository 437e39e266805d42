"""SlurmJobSystem against the real sandbox cluster (marker slurm)."""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import httpx
import pytest

from hpc.config import AgentConfig
from hpc.jobs.script import render_job
from hpc.jobs.slurm import SlurmError, SlurmJobSystem
from hpc.jobs.system import JobTag, Submission, job_dir
from saia.sandbox.slurm import SlurmSandbox
from tests.hpc.helpers import job_processes, wait_endpoint, wait_healthy

pytestmark = pytest.mark.slurm


def agent_config(cluster: SlurmSandbox, state_dir: Path, **extra: object) -> AgentConfig:
    return AgentConfig.model_validate(
        {
            "state_dir": state_dir,
            "slurm_conf": cluster.slurm_conf,
            "slurm_bin_dir": cluster.bin_dir,
            "slurm_timeout": 15,
            **extra,
        }
    )


def sleep_submission(
    tag: JobTag, state_dir: Path, service: str = "svc", extra: str = ""
) -> Submission:
    script = f"#!/bin/bash\n#SBATCH --time=5\n#SBATCH --cpus-per-task=1\n{extra}\nexec sleep 300\n"
    return Submission(
        service=service,
        script=script,
        job_name=tag.job_name(service),
        comment=tag.comment,
        log_path=state_dir / "jobs" / "%j.log",
        environment={},
    )


async def wait_until_gone(jobs: SlurmJobSystem, job_id: str, limit_s: float = 30.0) -> None:
    async with asyncio.timeout(limit_s):
        while True:
            if all(job.job_id != job_id for job in await jobs.list_jobs()):
                return
            await asyncio.sleep(0.3)


def foreign_job(cluster: SlurmSandbox, name: str, comment: str) -> str:
    submitted = cluster.run(
        [
            "sbatch",
            "--parsable",
            f"--job-name={name}",
            f"--comment={comment}",
            "--cpus-per-task=1",
            "--output=/dev/null",
            "--time=5",
            "--wrap",
            "sleep 300",
        ]
    )
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.strip()


def queued(cluster: SlurmSandbox, job_id: str) -> bool:
    shown = cluster.run(["squeue", "--noheader", f"--jobs={job_id}", "--format=%i"])
    return shown.stdout.strip() == job_id


async def test_submit_list_cancel_only_our_jobs(
    slurm_cluster: SlurmSandbox, tmp_path: Path
) -> None:
    tag = JobTag(prefix="saia", agent_id=uuid.uuid4().hex[:8])
    jobs = SlurmJobSystem(agent_config(slurm_cluster, tmp_path), tag)
    other_comment = foreign_job(slurm_cluster, tag.job_name("svc"), "saia-agent:someone-else")
    other_name = foreign_job(slurm_cluster, "my-own-job", tag.comment)
    try:
        job_id = await jobs.submit(sleep_submission(tag, tmp_path))
        listed = await jobs.list_jobs()
        assert [(job.job_id, job.service) for job in listed] == [(job_id, "svc")]
        assert listed[0].active and listed[0].time_limit_s == 300
        for foreign in (other_comment, other_name):
            with pytest.raises(SlurmError, match="not one of this agent's jobs"):
                await jobs.cancel(foreign)
            assert queued(slurm_cluster, foreign)
        await jobs.cancel(job_id)
        await wait_until_gone(jobs, job_id)
        await jobs.cancel(job_id)  # already gone: nothing to do
    finally:
        slurm_cluster.run(["scancel", other_comment, other_name])
        await jobs.aclose()


async def test_bad_sbatch_option_is_slurms_message(
    slurm_cluster: SlurmSandbox, tmp_path: Path
) -> None:
    tag = JobTag(prefix="saia", agent_id=uuid.uuid4().hex[:8])
    jobs = SlurmJobSystem(agent_config(slurm_cluster, tmp_path), tag)
    bad = sleep_submission(tag, tmp_path, extra="#SBATCH --partition=nosuch")
    with pytest.raises(SlurmError, match="sbatch: invalid partition specified: nosuch"):
        await jobs.submit(bad)
    assert await jobs.list_jobs() == []


async def test_missing_slurm_tools_are_a_clear_error(tmp_path: Path) -> None:
    config = AgentConfig.model_validate({"state_dir": tmp_path, "slurm_bin_dir": tmp_path / "none"})
    jobs = SlurmJobSystem(config, JobTag(prefix="saia", agent_id="x"))
    with pytest.raises(SlurmError, match="squeue: cannot run"):
        await jobs.list_jobs()


def hanging_squeue(tmp_path: Path) -> tuple[Path, Path]:
    """A fake Slurm bin dir whose squeue records its pid and then hangs."""
    bin_dir, pid_file = tmp_path / "bin", tmp_path / "squeue.pid"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text(f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 30\n")
    (bin_dir / "squeue").chmod(0o755)
    return bin_dir, pid_file


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_hanging_tool_times_out_and_is_killed(tmp_path: Path) -> None:
    bin_dir, pid_file = hanging_squeue(tmp_path)
    config = AgentConfig.model_validate(
        {"state_dir": tmp_path, "slurm_bin_dir": bin_dir, "slurm_timeout": 0.5}
    )
    jobs = SlurmJobSystem(config, JobTag(prefix="saia", agent_id="x"))
    with pytest.raises(SlurmError, match="squeue: no answer within"):
        await jobs.list_jobs()
    assert not pid_alive(int(pid_file.read_text()))


async def test_cancelled_call_kills_its_process(tmp_path: Path) -> None:
    bin_dir, pid_file = hanging_squeue(tmp_path)
    config = AgentConfig.model_validate({"state_dir": tmp_path, "slurm_bin_dir": bin_dir})
    jobs = SlurmJobSystem(config, JobTag(prefix="saia", agent_id="x"))
    call = asyncio.create_task(jobs.list_jobs())
    async with asyncio.timeout(10):
        while True:
            if pid_file.exists() and pid_file.read_text().strip():
                break
            await asyncio.sleep(0.02)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert not pid_alive(int(pid_file.read_text()))


async def test_cancel_rejects_non_job_ids(tmp_path: Path) -> None:
    config = AgentConfig.model_validate({"state_dir": tmp_path})
    jobs = SlurmJobSystem(config, JobTag(prefix="saia", agent_id="x"))
    with pytest.raises(SlurmError, match="not a Slurm job id"):
        await jobs.cancel("1; rm -rf /")


def standin_config(cluster: SlurmSandbox, state_dir: Path) -> AgentConfig:
    service = {
        "name": "tiny",
        "model": "tiny-model",
        "template": "standin",
        "renewal_lead": 30,
        "resources": {"gpus": 1, "cpus": 1, "memory": "1G", "time_limit": "5:00"},
    }
    return agent_config(
        cluster,
        state_dir,
        backend_bind_host="127.0.0.1",
        backend_advertise_host="127.0.0.1",
        services=[service],
    )


async def test_standin_job_serves_and_stops(slurm_cluster: SlurmSandbox, tmp_path: Path) -> None:
    config = standin_config(slurm_cluster, tmp_path)
    tag = JobTag(prefix="saia", agent_id=uuid.uuid4().hex[:8])
    jobs = SlurmJobSystem(config, tag)
    job_id = await jobs.submit(render_job(config.services[0], config, tag))
    try:
        endpoint = await wait_endpoint(config.state_dir, job_id)
        assert endpoint.host == "127.0.0.1"
        key = (job_dir(config.state_dir, job_id) / "api_key").read_text()  # the job's own
        auth = {"Authorization": f"Bearer {key}"}
        verify = endpoint.tls() or True  # the job's own certificate (backend_tls)
        async with httpx.AsyncClient(base_url=endpoint.url, timeout=5, verify=verify) as client:
            await wait_healthy(client)
            models = (await client.get("/v1/models", headers=auth)).json()
        assert [model["id"] for model in models["data"]] == ["tiny"]
        assert job_processes(config.state_dir, job_id)
    finally:
        await jobs.cancel(job_id)
    await wait_until_gone(jobs, job_id)
    assert job_processes(config.state_dir, job_id) == []
    log = (job_dir(config.state_dir, job_id) / "job.log").read_text()
    assert f"saia: job {job_id} serves tiny on 127.0.0.1:{endpoint.port}" in log
    assert "saia: server exited with status 0" in log
