"""The real `vllm serve` (CPU build, tiny local model) in a real sandbox Slurm job.

The agent submits the `vllm` template, judges readiness by vLLM's own /health and
/v1/models (with the per-job backend key), shows vLLM's own /metrics figures in its
status, and its router forwards completions; at the end scancel stops vLLM through the
job's SIGTERM handler and no process of the job remains. One vLLM at a time (about 3 GB
RSS); each test takes about a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import stat
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hpc.config import AgentConfig, parse_config
from hpc.jobs.script import render_job
from hpc.jobs.slurm import SlurmJobSystem
from hpc.jobs.system import JobTag, job_dir
from hpc.registry import Backend, BackendRegistry
from hpc.scheduler.agent import run_agent
from hpc.scheduler.state import agent_id
from hpc.scheduler.status import JobStatus, StatusError, read_status
from hpc.scheduler.vllm_metrics import parse_vllm_metrics
from saia.base import protocol as wire
from saia.base.mux import Channel
from saia.base.pinned_tls import pinned_context
from saia.sandbox.slurm import SlurmSandbox
from saia.sandbox.vllm import VllmInstall
from tests.hpc.helpers import job_processes, until, wait_endpoint, wait_healthy
from tests.saia.mux_helpers import next_frame

pytestmark = pytest.mark.vllm
SERVICE = "tiny"
START_LIMIT = 300.0  # vLLM on 2 CPU cores: about 45 s, more when the machine is busy
STOP_LIMIT = 60.0


def vllm_config(
    cluster: SlurmSandbox, install: VllmInstall, state_dir: Path, prefix: str, **options: Any
) -> AgentConfig:
    service = {
        "name": SERVICE,
        "model": str(install.model_dir),
        "template": "vllm",
        "server_command": [str(install.vllm), "serve"],
        "environment": {"VLLM_CPU_KVCACHE_SPACE": "1"},
        "vllm": {"max_model_len": 256, "dtype": "float32", "enforce_eager": True},
        "min_instances": 1,
        "max_instances": 1,
        "startup_timeout": f"{START_LIMIT:.0f}s",
        "renewal_lead": "60s",
        "resources": {"gpus": 1, "cpus": 2, "memory": "4G", "time_limit": "20:00"},
        **options,
    }
    return parse_config(
        {
            "state_dir": str(state_dir),
            "slurm_conf": str(cluster.slurm_conf),
            "slurm_bin_dir": str(cluster.bin_dir),
            "job_prefix": prefix,
            "poll_interval": 1,
            "health_interval": 1,
            "health_timeout": 5,
            "backend_bind_host": "127.0.0.1",
            "backend_advertise_host": "127.0.0.1",
            "python": sys.executable,
            "services": [service],
        }
    )


@pytest.fixture
def prefix(slurm_cluster: SlurmSandbox) -> Any:
    name = "v" + uuid.uuid4().hex[:8]
    yield name
    slurm_cluster.run(["scancel", f"--name={name}-{SERVICE}"])


async def gone_from_slurm(config: AgentConfig, tag: JobTag, job_id: str) -> None:
    jobs = SlurmJobSystem(config, tag)
    async with asyncio.timeout(STOP_LIMIT):
        while job_id in [j.job_id for j in await jobs.list_jobs()]:  # noqa: ASYNC110
            await asyncio.sleep(0.5)
    await jobs.aclose()


@contextlib.asynccontextmanager
async def running_agent(config: AgentConfig) -> AsyncIterator[BackendRegistry]:
    registry = BackendRegistry()
    task = asyncio.create_task(run_agent(config, registry=registry, standby_poll=0.2))
    try:
        yield registry
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class RouterClient:
    """A client of the agent's router on `<state_dir>/agent.sock` (the relay's side)."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.next_id = 0

    async def request(self, method: str, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
        self.next_id += 1
        state = self.channel.open(self.next_id)
        data = json.dumps(body).encode()
        head = wire.RequestHead(SERVICE, method, path, [("content-type", "application/json")])
        self.channel.send(wire.encode_request(state.id, head))
        await self.channel.send_data(state, data)
        self.channel.send(wire.encode_frame(wire.END, state.id))
        status, chunks = 0, []
        while (frame := await next_frame(self.channel)) is not None:
            assert frame.stream == state.id, wire.describe(frame)
            if frame.type == wire.RESPONSE:
                status = wire.parse_response(frame.payload).status
            elif frame.type == wire.DATA:
                self.channel.consumed(state, len(frame.payload))
                chunks.append(frame.payload)
            elif frame.type == wire.END:
                break
            else:
                pytest.fail(f"the router answered {wire.describe(frame)}")
        self.channel.discard(state)
        return status, b"".join(chunks)


@contextlib.asynccontextmanager
async def router_client(state_dir: Path) -> AsyncIterator[RouterClient]:
    reader, writer = await asyncio.open_unix_connection(str(state_dir / "agent.sock"))
    try:
        channel = Channel(reader, writer)
        channel.send(wire.encode_hello())
        async with asyncio.timeout(10):
            assert await channel.read_hello() == wire.VERSION
        yield RouterClient(channel)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def chat(stream: bool) -> dict[str, Any]:
    return {
        "model": SERVICE,
        "messages": [{"role": "user", "content": "hello from the test"}],
        "max_tokens": 5,
        "stream": stream,
        **({"stream_options": {"include_usage": True}} if stream else {}),
    }


def sse_events(body: bytes) -> list[str]:
    return [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")]


async def check_backend_directly(backend: Backend) -> None:
    """The key guards every path (401 without it); /metrics is vLLM's real Prometheus
    output."""
    assert backend.api_key, "the agent did not read the job's backend key"
    pinned = pinned_context(backend.certificate) if backend.certificate else True
    async with httpx.AsyncClient(
        base_url=backend.url, trust_env=False, timeout=30, verify=pinned
    ) as client:
        assert (await client.get("/v1/models")).status_code == 401
        auth = {"Authorization": f"Bearer {backend.api_key}"}
        models = (await client.get("/v1/models", headers=auth)).json()
        assert [m["id"] for m in models["data"]] == [SERVICE]
        assert models["data"][0]["max_model_len"] == 256
        assert (await client.get("/metrics")).status_code == 401
        metrics = parse_vllm_metrics((await client.get("/metrics", headers=auth)).text)
    assert SERVICE in metrics
    assert metrics[SERVICE].running == 0
    assert metrics[SERVICE].waiting == 0


async def check_through_router(state_dir: Path) -> None:
    async with router_client(state_dir) as router:
        status, body = await router.request("POST", "/v1/chat/completions", chat(False))
        assert status == 200, body[:300]
        answer = json.loads(body)
        assert answer["model"] == SERVICE
        assert answer["usage"]["completion_tokens"] == 5
        status, body = await router.request("POST", "/v1/chat/completions", chat(True))
        assert status == 200, body[:300]
        events = sse_events(body)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
        assert all(c["id"] == chunks[0]["id"] for c in chunks)


async def check_status_shows_load(state_dir: Path, job_id: str) -> None:
    """The agent read vLLM's own /metrics: the job's figures (the KV cache gauge is vLLM's
    alone) and the service's totals, in the status `saia hpc status` shows."""

    def figures() -> JobStatus | None:
        with contextlib.suppress(StatusError):
            for job in read_status(state_dir).jobs:
                if job.job_id == job_id and job.kv_cache_usage is not None:
                    return job
        return None

    job = await until(figures, 30, "no vLLM load figures in the agent's status")
    assert (job.running, job.waiting, job.metrics) == (0, 0, "")
    assert job.kv_cache_usage is not None and 0 <= job.kv_cache_usage <= 1
    service = read_status(state_dir).services[0]
    assert (service.running, service.waiting) == (0, 0)
    assert service.kv_cache_usage is not None


async def test_agent_runs_vllm_in_slurm_and_routes_to_it(
    slurm_cluster: SlurmSandbox, vllm_install: VllmInstall, prefix: str, tmp_path: Path
) -> None:
    config = vllm_config(slurm_cluster, vllm_install, tmp_path, prefix)
    async with running_agent(config) as registry:
        ready = await until(lambda: registry.ready(SERVICE), START_LIMIT, "vLLM not ready")
        backend = ready[0]
        key_file = job_dir(tmp_path, backend.job_id) / "api_key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert backend.api_key == key_file.read_text()
        running = job_processes(tmp_path, backend.job_id)
        assert any("vllm" in cmd for cmd in running), running
        assert not any(backend.api_key in cmd for cmd in running)
        await check_backend_directly(backend)
        await check_through_router(tmp_path)
        await check_status_shows_load(tmp_path, backend.job_id)
        tag = JobTag(prefix, agent_id(tmp_path))
    assert slurm_cluster.run(["scancel", backend.job_id]).returncode == 0
    await gone_from_slurm(config, tag, backend.job_id)
    await until(lambda: not job_processes(tmp_path, backend.job_id), 15, "the job left processes")
    log = (job_dir(tmp_path, backend.job_id) / "job.log").read_text(errors="replace")
    assert "SIGTERM received, stopping the server" in log
    assert "server exited with status 0" in log


async def test_embeddings_job_without_backend_key(
    slurm_cluster: SlurmSandbox, vllm_install: VllmInstall, prefix: str, tmp_path: Path
) -> None:
    """The pooling runner (`task: embed`) submitted directly; api_key off: no key at all."""
    config = vllm_config(
        slurm_cluster,
        vllm_install,
        tmp_path,
        prefix,
        api_key=False,
        vllm={"max_model_len": 256, "dtype": "float32", "enforce_eager": True, "task": "embed"},
    )
    tag = JobTag(prefix, "embed-test")
    jobs = SlurmJobSystem(config, tag)
    job_id = await jobs.submit(render_job(config.services[0], config, tag))
    try:
        # Slurm may hold it until the previous test's job has released the node's memory.
        endpoint = await wait_endpoint(tmp_path, job_id, START_LIMIT)
        assert not (job_dir(tmp_path, job_id) / "api_key").exists()
        pinned = endpoint.tls() or True  # the job's own certificate (backend_tls, the default)
        async with httpx.AsyncClient(
            base_url=endpoint.url, trust_env=False, timeout=30, verify=pinned
        ) as client:
            await wait_healthy(client, START_LIMIT, poll_s=1)
            answer = await client.post(
                "/v1/embeddings", json={"model": SERVICE, "input": ["hello world", "slurm"]}
            )
        assert answer.status_code == 200, answer.text
        vectors = [item["embedding"] for item in answer.json()["data"]]
        assert len(vectors) == 2 and len(vectors[0]) == 128 and vectors[0] != vectors[1]
    finally:
        await jobs.cancel(job_id)
        await jobs.aclose()
    await gone_from_slurm(config, tag, job_id)
    await until(lambda: not job_processes(tmp_path, job_id), 15, "the job left processes")
