"""LocalJobSystem with real job scripts: the rendered standin job, limits, adoption, leaks."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import httpx
import pytest

from hpc.config import AgentConfig
from hpc.jobs.local import (
    DEFAULT_LIMIT_S,
    LocalJobError,
    LocalJobSystem,
    parse_sbatch_options,
    read_record,
)
from hpc.jobs.script import render_job
from hpc.jobs.system import JobTag, Submission, job_dir
from tests.hpc.helpers import wait_endpoint, wait_healthy

TAG = JobTag(prefix="saia", agent_id="local-test")


def local_config(state_dir: Path, gpus: int = 1) -> AgentConfig:
    service = {
        "name": "tiny",
        "model": "tiny",
        "template": "standin",
        "renewal_lead": 30,
        "resources": {"gpus": gpus, "cpus": 1, "memory": "1G", "time_limit": "5:00"},
    }
    return AgentConfig.model_validate(
        {
            "state_dir": state_dir,
            "executor": "local",
            "backend_bind_host": "127.0.0.1",
            "backend_advertise_host": "127.0.0.1",
            "services": [service],
        }
    )


def raw_submission(state_dir: Path, body: str, options: str = "--time=5") -> Submission:
    return Submission(
        service="raw",
        script=f"#!/bin/bash\n#SBATCH {options}\n{body}\n",
        job_name=TAG.job_name("raw"),
        comment=TAG.comment,
        log_path=state_dir / "jobs" / "%j.log",
        environment={},
    )


def group_members(pgid: int) -> list[int]:
    """Live processes whose process group is `pgid`."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def process_environ(pid: int) -> list[bytes]:
    return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")


async def wait_no_jobs(jobs: LocalJobSystem, limit_s: float = 30) -> None:
    async with asyncio.timeout(limit_s):
        while True:
            if not await jobs.list_jobs():
                return
            await asyncio.sleep(0.1)


def test_sbatch_options_of_a_rendered_script(tmp_path: Path) -> None:
    config = local_config(tmp_path, gpus=2)
    request = parse_sbatch_options(render_job(config.services[0], config, TAG).script)
    assert (request.time_limit_s, request.gpus, request.nodes) == (300, 2, 1)


def test_sbatch_options_stop_at_the_first_command() -> None:
    script = "#!/bin/bash\n#SBATCH --time=1:00\necho hi\n#SBATCH --gres=gpu:3\n"
    request = parse_sbatch_options(script)
    assert (request.time_limit_s, request.gpus) == (60, 0)
    assert parse_sbatch_options("#!/bin/bash\ntrue\n").time_limit_s == DEFAULT_LIMIT_S
    with pytest.raises(LocalJobError):
        parse_sbatch_options("#!/bin/bash\n#SBATCH --time=soon\n")


async def test_standin_job_serves_and_cancel_leaves_nothing(tmp_path: Path) -> None:
    config = local_config(tmp_path)
    jobs = LocalJobSystem(config, TAG, gpu_count=4, kill_grace=10)
    try:
        job_id = await jobs.submit(render_job(config.services[0], config, TAG))
        endpoint = await wait_endpoint(tmp_path, job_id, limit_s=30)
        key = (job_dir(tmp_path, job_id) / "api_key").read_text()  # the job guards its server
        auth = {"Authorization": f"Bearer {key}"}
        verify = endpoint.tls() or True  # the job's own certificate (backend_tls)
        async with httpx.AsyncClient(base_url=endpoint.url, timeout=5, verify=verify) as client:
            await wait_healthy(client)
            models = (await client.get("/v1/models", headers=auth)).json()
        assert [model["id"] for model in models["data"]] == ["tiny"]
        [info] = await jobs.list_jobs()
        assert (info.job_id, info.service, info.state) == (job_id, "tiny", "RUNNING")
        assert info.time_limit_s == 300 and 0 < (info.time_left_s or 0) <= 300
        record = read_record(tmp_path, job_id)
        assert record is not None and record.gpus == [0]
        environ = process_environ(record.pid)
        assert b"CUDA_VISIBLE_DEVICES=0" in environ and f"SLURM_JOB_ID={job_id}".encode() in environ
        assert len(group_members(record.pid)) >= 2  # the shell and the server
        await jobs.cancel(job_id)
        await wait_no_jobs(jobs)
        assert group_members(record.pid) == []
        log = (job_dir(tmp_path, job_id) / "job.log").read_text()
        assert "saia: server exited with status 0" in log
    finally:
        await jobs.aclose()


async def test_restarted_system_adopts_running_jobs(tmp_path: Path) -> None:
    config = local_config(tmp_path)
    first = LocalJobSystem(config, TAG, kill_grace=5)
    job_id = await first.submit(raw_submission(tmp_path, "exec sleep 300"))
    await first.aclose()
    record = read_record(tmp_path, job_id)
    assert record is not None and group_members(record.pid)  # still running
    second = LocalJobSystem(config, TAG, kill_grace=5)
    stranger = LocalJobSystem(config, JobTag(prefix="saia", agent_id="other"))
    try:
        assert [job.job_id for job in await second.list_jobs()] == [job_id]
        assert await stranger.list_jobs() == []
        with pytest.raises(LocalJobError, match="not one of this agent's jobs"):
            await stranger.cancel(job_id)
        next_id = await second.submit(raw_submission(tmp_path, "exec sleep 300"))
        assert next_id != job_id
        await second.cancel(job_id)
        await second.cancel(next_id)
        await wait_no_jobs(second)
        assert group_members(record.pid) == []
    finally:
        await second.aclose()
        await stranger.aclose()


async def test_time_limit_is_enforced_with_sigkill_after_grace(tmp_path: Path) -> None:
    jobs = LocalJobSystem(local_config(tmp_path), TAG, kill_grace=1)
    stubborn = "trap '' TERM\nsleep 300 &\nwait"
    try:
        started = time.monotonic()
        job_id = await jobs.submit(raw_submission(tmp_path, stubborn, "--time=0:02"))
        record = read_record(tmp_path, job_id)
        assert record is not None and record.limit_s == 2
        await wait_no_jobs(jobs, limit_s=15)
        assert 2.5 <= time.monotonic() - started < 15
        assert group_members(record.pid) == []
    finally:
        await jobs.aclose()


async def test_gpus_are_not_handed_out_twice(tmp_path: Path) -> None:
    jobs = LocalJobSystem(local_config(tmp_path), TAG, gpu_count=2, kill_grace=2)
    try:
        first = await jobs.submit(raw_submission(tmp_path, "exec sleep 300", "--gres=gpu:2"))
        with pytest.raises(LocalJobError, match=r"1 GPU\(s\) requested, 0 of 2 free"):
            await jobs.submit(raw_submission(tmp_path, "exec sleep 300", "--gres=gpu:1"))
        await jobs.cancel(first)
        await wait_no_jobs(jobs)
    finally:
        await jobs.aclose()


async def test_aclose_releases_tasks_and_descriptors(tmp_path: Path) -> None:
    fds_before = len(os.listdir("/proc/self/fd"))
    tasks_before = len(asyncio.all_tasks())
    jobs = LocalJobSystem(local_config(tmp_path), TAG, kill_grace=2)
    job_ids = [await jobs.submit(raw_submission(tmp_path, "exec sleep 300")) for _ in range(3)]
    assert len(asyncio.all_tasks()) == tasks_before + 3
    await jobs.aclose()
    assert len(asyncio.all_tasks()) == tasks_before
    assert len(os.listdir("/proc/self/fd")) == fds_before
    cleanup = LocalJobSystem(local_config(tmp_path), TAG, kill_grace=2)
    try:
        for job_id in job_ids:
            await cleanup.cancel(job_id)
        await wait_no_jobs(cleanup)
    finally:
        await cleanup.aclose()


async def test_bad_ids_and_multinode_are_refused(tmp_path: Path) -> None:
    jobs = LocalJobSystem(local_config(tmp_path), TAG)
    try:
        with pytest.raises(LocalJobError, match="not a local job id"):
            await jobs.cancel("../../etc")
        await jobs.cancel("local-999")  # never existed: nothing to do
        with pytest.raises(LocalJobError, match="single-node"):
            await jobs.submit(raw_submission(tmp_path, "true", "--nodes=2"))
    finally:
        await jobs.aclose()
