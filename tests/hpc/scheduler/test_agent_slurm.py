"""The agent in-process against the real sandbox Slurm cluster, with stand-in model servers.

Each test uses its own job prefix and state dir; jobs left over are cancelled by name at
the end. Intervals are short so the whole file runs in about a minute or two.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from hpc.config import AgentConfig, parse_config
from hpc.jobs.slurm import SlurmJobSystem
from hpc.jobs.system import JobInfo, JobTag
from hpc.registry import Backend, BackendRegistry
from hpc.scheduler.agent import run_agent
from hpc.scheduler.state import agent_id
from saia.base.pinned_tls import pinned_context
from saia.sandbox.slurm import SlurmSandbox
from tests.hpc.helpers import until as poll_until

pytestmark = pytest.mark.slurm
SERVICE = "tiny"


def cluster_settings(cluster: SlurmSandbox, state_dir: Path, prefix: str) -> dict[str, Any]:
    """Top-level agent settings for the sandbox cluster: fast polling, loopback only."""
    return {
        "state_dir": str(state_dir),
        "slurm_conf": str(cluster.slurm_conf),
        "slurm_bin_dir": str(cluster.bin_dir),
        "slurm_timeout": 20,
        "job_prefix": prefix,
        "poll_interval": 0.5,
        "health_interval": 0.25,
        "health_timeout": 2,
        "health_failures": 2,
        "backend_bind_host": "127.0.0.1",
        "backend_advertise_host": "127.0.0.1",
        "python": sys.executable,
    }


# A service of the stand-in model server in one small job on the sandbox cluster, started
# and replaced at once (add its name and model).
STANDIN_SERVICE: dict[str, Any] = {
    "template": "standin",
    "min_instances": 1,
    "max_instances": 1,
    "startup_timeout": "60s",
    "renewal_lead": "60s",
    "scale_down_delay": 0,
    "startup_backoff": 1,
    "resources": {"gpus": 1, "cpus": 1, "memory": "256M", "time_limit": "10:00"},
}


def agent_config(
    cluster: SlurmSandbox, state_dir: Path, prefix: str, **service: Any
) -> AgentConfig:
    standin = STANDIN_SERVICE | {"name": SERVICE, "model": "tiny"}
    settings = cluster_settings(cluster, state_dir, prefix)
    return parse_config(settings | {"services": [standin | service]})


@pytest.fixture
def prefix(slurm_cluster: SlurmSandbox) -> Any:
    """A job prefix of this test only; its jobs are cancelled at the end."""
    name = "t" + uuid.uuid4().hex[:8]
    yield name
    slurm_cluster.run(["scancel", f"--name={name}-{SERVICE}"])


@contextlib.asynccontextmanager
async def running_agent(
    config: AgentConfig, registry: BackendRegistry | None = None, config_path: Path | None = None
) -> AsyncIterator[BackendRegistry]:
    """Run the agent as a task; on exit cancel it and check it left no task behind."""
    registry = registry or BackendRegistry()
    before = asyncio.all_tasks()
    task = asyncio.create_task(
        run_agent(config, registry=registry, standby_poll=0.2, config_path=config_path)
    )
    try:
        yield registry
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert task.cancelled(), "the agent ended on its own"
        assert asyncio.all_tasks() - before == set(), "the agent leaked tasks"
        assert not (config.state_dir / "agent.sock").exists()


T = TypeVar("T")


async def until(check: Callable[[], T], limit_s: float, what: str) -> T:
    return await poll_until(check, limit_s, what, poll_s=0.05)


def ready(registry: BackendRegistry) -> list[Backend]:
    return registry.ready(SERVICE)


async def our_jobs(config: AgentConfig) -> list[JobInfo]:
    tag = JobTag(config.job_prefix, agent_id(config.state_dir))
    return await SlurmJobSystem(config, tag).list_jobs()


async def test_min_instance_becomes_ready_and_serves(
    slurm_cluster: SlurmSandbox, prefix: str, tmp_path: Path
) -> None:
    """The job's server demands its per-job key: readiness and requests must carry it."""
    config = agent_config(
        slurm_cluster, tmp_path, prefix, server_args=["--api-key-env", "VLLM_API_KEY"]
    )
    async with running_agent(config) as registry:
        backend = (await until(lambda: ready(registry), 60, "no backend became ready"))[0]
        key_file = tmp_path / "jobs" / backend.job_id / "api_key"
        assert backend.api_key and backend.api_key == key_file.read_text().strip()
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hello there"}]}
        assert backend.certificate  # backend_tls: the job's own certificate, pinned
        verify = pinned_context(backend.certificate)
        async with httpx.AsyncClient(trust_env=False, timeout=10, verify=verify) as client:
            url = f"{backend.url}/v1/chat/completions"
            assert (await client.post(url, json=chat)).status_code == 401
            headers = {"Authorization": f"Bearer {backend.api_key}"}
            answer = await client.post(url, json=chat, headers=headers)
        assert answer.status_code == 200
        assert answer.json()["choices"][0]["message"]["content"]
        jobs = await our_jobs(config)
        assert [j.job_id for j in jobs] == [backend.job_id]
        assert jobs[0].running


async def test_job_cancelled_from_outside_is_replaced(
    slurm_cluster: SlurmSandbox, prefix: str, tmp_path: Path
) -> None:
    config = agent_config(slurm_cluster, tmp_path, prefix)
    async with running_agent(config) as registry:
        first = (await until(lambda: ready(registry), 60, "not ready"))[0].job_id
        assert slurm_cluster.run(["scancel", first]).returncode == 0

        def replaced() -> list[Backend]:
            return [b for b in ready(registry) if b.job_id != first]

        await until(replaced, 60, "no replacement became ready")
        assert first not in [j.job_id for j in await our_jobs(config)]


def published(registry: BackendRegistry) -> dict[str, bool]:
    """Job id -> draining, of every backend the agent publishes (ready or draining)."""
    return {b.job_id: b.draining for b in registry._state(SERVICE).backends.values()}


async def sample_ready(registry: BackendRegistry, counts: list[int]) -> None:
    while True:  # until cancelled; one sample every 20 ms
        counts.append(len(ready(registry)))
        await asyncio.sleep(0.02)


async def test_renewal_overlaps_without_a_gap(
    slurm_cluster: SlurmSandbox, prefix: str, tmp_path: Path
) -> None:
    """A 2-minute job renewed 100 s before its limit: the old one drains, then goes."""
    config = agent_config(
        slurm_cluster,
        tmp_path,
        prefix,
        renewal_lead="100s",
        resources={"gpus": 1, "cpus": 1, "memory": "256M", "time_limit": "2:00"},
    )
    async with running_agent(config) as registry:
        old = (await until(lambda: ready(registry), 60, "not ready"))[0]
        old.in_flight += 1  # as the router does while it streams a response from the old job
        counts: list[int] = []
        sampler = asyncio.create_task(sample_ready(registry, counts))
        try:
            new = await until(
                lambda: [b for b in ready(registry) if b.job_id != old.job_id], 90, "no renewal"
            )
            await until(lambda: published(registry).get(old.job_id), 10, "old not draining")
            await asyncio.sleep(1.5)  # several loops: a draining job with a request is kept
            assert old.job_id in [j.job_id for j in await our_jobs(config)]
            old.in_flight -= 1  # the request finished
            await until(lambda: old.job_id not in published(registry), 10, "old kept")
            jobs = await until_async_jobs(config, lambda ids: old.job_id not in ids, 30)
            assert jobs == [new[0].job_id]
        finally:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
        assert len(counts) > 100 and min(counts) >= 1, "a moment without a ready backend"
        assert published(registry) == {new[0].job_id: False}


async def until_async_jobs(
    config: AgentConfig, check: Callable[[list[str]], bool], limit_s: float
) -> list[str]:
    async with asyncio.timeout(limit_s):
        while not check(ids := [j.job_id for j in await our_jobs(config)]):  # noqa: ASYNC110
            await asyncio.sleep(0.3)
    return ids


async def test_restart_adopts_jobs_without_duplicates(
    slurm_cluster: SlurmSandbox, prefix: str, tmp_path: Path
) -> None:
    config = agent_config(slurm_cluster, tmp_path, prefix)
    async with running_agent(config) as registry:
        first = (await until(lambda: ready(registry), 60, "not ready"))[0].job_id
    # the agent stopped; its job keeps running for the next one
    assert [j.job_id for j in await our_jobs(config)] == [first]
    async with running_agent(config) as registry:
        adopted = await until(lambda: ready(registry), 30, "not re-published")
        await asyncio.sleep(1.5)  # a few loops: nothing new is submitted
        assert [b.job_id for b in adopted] == [first]
        assert [j.job_id for j in await our_jobs(config)] == [first]


async def test_corrupt_state_is_rebuilt_from_slurm(
    slurm_cluster: SlurmSandbox, prefix: str, tmp_path: Path
) -> None:
    config = agent_config(slurm_cluster, tmp_path, prefix)
    async with running_agent(config) as registry:
        first = (await until(lambda: ready(registry), 60, "not ready"))[0].job_id
    (tmp_path / "agent-state.json").write_text("{garbage")
    async with running_agent(config) as registry:
        await until(lambda: ready(registry), 30, "not re-published")
        assert [j.job_id for j in await our_jobs(config)] == [first]


async def test_second_agent_stands_by_then_takes_over(
    slurm_cluster: SlurmSandbox, prefix: str, tmp_path: Path
) -> None:
    config = agent_config(slurm_cluster, tmp_path, prefix)
    first_registry, second_registry = BackendRegistry(), BackendRegistry()
    first = asyncio.create_task(run_agent(config, registry=first_registry, standby_poll=0.2))
    second: asyncio.Task[None] | None = None
    try:
        job_id = (await until(lambda: ready(first_registry), 60, "not ready"))[0].job_id
        second = asyncio.create_task(run_agent(config, registry=second_registry, standby_poll=0.2))
        await asyncio.sleep(1.5)
        assert not second.done()
        assert ready(second_registry) == []  # standby: it neither observes nor acts
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        taken = await until(lambda: ready(second_registry), 30, "no take-over")
        assert [b.job_id for b in taken] == [job_id]
        assert [j.job_id for j in await our_jobs(config)] == [job_id]
    finally:
        for task in (first, second):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)


async def test_scale_from_zero_on_demand_and_back_to_zero(
    slurm_cluster: SlurmSandbox, prefix: str, tmp_path: Path
) -> None:
    config = agent_config(slurm_cluster, tmp_path, prefix, min_instances=0, look_back="3s")
    async with running_agent(config) as registry:
        await asyncio.sleep(1.0)
        assert await our_jobs(config) == []  # no demand, no job
        # what the router does for a request that finds no backend:
        waiter = asyncio.create_task(registry.wait_ready(SERVICE))
        await asyncio.sleep(0)
        registry.note_demand(SERVICE, time.monotonic())
        await asyncio.wait_for(waiter, 60)
        assert len(ready(registry)) == 1
        # nothing in flight for look_back (3 s): drained and cancelled, back to zero
        await until(lambda: not ready(registry), 30, "not scaled down")
        assert await until_async_jobs(config, lambda ids: not ids, 30) == []


async def test_failed_starts_are_replaced_with_growing_backoff(
    slurm_cluster: SlurmSandbox, prefix: str, tmp_path: Path
) -> None:
    """A server that never answers: cancelled after startup_timeout, resubmitted later."""
    config = agent_config(
        slurm_cluster,
        tmp_path,
        prefix,
        startup_timeout="2s",
        startup_backoff="1s",
        server_command=["bash", "-c", "exec sleep 600", "never-listens"],
    )
    async with running_agent(config):
        state = tmp_path / "agent-state.json"

        def failures() -> int:
            try:
                data = json.loads(state.read_text())
            except (OSError, ValueError):
                return 0
            return int(data["backoff"].get(SERVICE, {}).get("failures", 0))

        await until(lambda: failures() >= 2, 60, "the failing job was not replaced twice")
        backoff = json.loads(state.read_text())["backoff"][SERVICE]
        assert backoff["not_before"] - backoff["last_failure"] == pytest.approx(2.0)  # 1 s, 2 s
        ids = [int(j.job_id) for j in await our_jobs(config)]
        assert len(ids) <= 2  # the current try, maybe the last one still stopping


def server_pid(port: int) -> int:
    """The stand-in server process listening on `port` (this machine is the only node)."""
    wanted = ["hpc.standin", "--port", str(port)]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if wanted[0] in argv and any(argv[i : i + 2] == wanted[1:] for i in range(len(argv))):
            return int(entry.name)
    raise AssertionError(f"no stand-in server on port {port}")


async def test_unhealthy_backend_is_taken_out_and_replaced(
    slurm_cluster: SlurmSandbox, prefix: str, tmp_path: Path
) -> None:
    config = agent_config(slurm_cluster, tmp_path, prefix).model_copy(
        update={"health_timeout": 0.5}
    )
    async with running_agent(config) as registry:
        sick = (await until(lambda: ready(registry), 60, "not ready"))[0]
        pid = server_pid(int(sick.url.rsplit(":", 1)[1]))
        os.kill(pid, signal.SIGSTOP)  # alive but answering nothing
        try:
            await until(lambda: sick.job_id not in registry._state(SERVICE).backends, 20, "kept")
            fresh = await until(lambda: ready(registry), 60, "no replacement")
            assert fresh[0].job_id != sick.job_id
            assert await until_async_jobs(config, lambda ids: sick.job_id not in ids, 30)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


async def test_scales_up_on_load_and_down_after_the_delay(
    slurm_cluster: SlurmSandbox, prefix: str, tmp_path: Path
) -> None:
    config = agent_config(
        slurm_cluster,
        tmp_path,
        prefix,
        max_instances=2,
        target_concurrency=2,
        look_back="1s",
        scale_down_delay="2s",
    )
    async with running_agent(config) as registry:
        first = (await until(lambda: ready(registry), 60, "not ready"))[0]
        first.in_flight += 3  # as the router counts 3 requests: ceil(3 / 2) = 2 instances
        both = await until(lambda: len(ready(registry)) == 2 and ready(registry), 60, "no 2nd")
        first.in_flight -= 3
        # idle again: one instance goes after look_back + scale_down_delay (3 s), not before
        await asyncio.sleep(1.5)
        assert len(ready(registry)) == 2
        await until(lambda: len(ready(registry)) == 1, 20, "not scaled down")
        ids = await until_async_jobs(config, lambda ids: len(ids) == 1, 30)
        assert ids[0] in {b.job_id for b in both}


async def test_refused_submission_is_reported_and_backs_off(
    slurm_cluster: SlurmSandbox, prefix: str, tmp_path: Path
) -> None:
    config = agent_config(
        slurm_cluster,
        tmp_path,
        prefix,
        min_instances=2,
        max_instances=2,
        startup_backoff="60s",
        resources={"partition": "no-such-partition", "cpus": 1, "time_limit": "10:00"},
    )
    async with running_agent(config):

        def warnings() -> list[str]:
            try:
                status = json.loads((tmp_path / "status.json").read_text())
            except (OSError, ValueError):
                return []
            return [w for w in status["services"][0]["warnings"] if "next submission" in w]

        assert await until(warnings, 30, "no back-off warning")
        state = json.loads((tmp_path / "agent-state.json").read_text())
        assert state["backoff"][SERVICE]["failures"] == 1  # one refusal, not one per instance
        assert state["jobs"] == {}
