"""Operator commands against a running agent: `saia hpc drain` and config reloads.

The agent runs in-process against the sandbox Slurm cluster with stand-in servers (as in
`test_agent_slurm.py`); the commands run as real `saia` processes, which find the agent
through its pid file and lock, and signal this process (the agent's loop handles it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import uuid
from pathlib import Path
from typing import Any

import pytest

from cloud_interface.relay import SOCKET_NAME
from hpc.config import AgentConfig, load_config
from saia.base import protocol as wire
from saia.base.mux import Channel
from saia.sandbox.slurm import SlurmSandbox
from tests.hpc.helpers import saia
from tests.hpc.scheduler.test_agent_slurm import (
    STANDIN_SERVICE,
    cluster_settings,
    our_jobs,
    published,
    running_agent,
    sample_ready,
    until,
    until_async_jobs,
)
from tests.saia.mux_helpers import next_frame

pytestmark = pytest.mark.slurm
SERVICE, SECOND = "tiny", "tiny2"
CHAT = "/v1/chat/completions"


def service_data(name: str) -> dict[str, Any]:
    return STANDIN_SERVICE | {"name": name, "model": name}


def write_config(
    path: Path, cluster: SlurmSandbox, prefix: str, services: list[Any], **top: Any
) -> AgentConfig:
    """The agent config as a file (a reload re-reads it); JSON is YAML."""
    settings = cluster_settings(cluster, path.parent / "state", prefix)
    data = settings | {"services": services, **top}
    path.write_text(json.dumps(data, indent=1))
    return load_config(path)


@pytest.fixture
def prefix(slurm_cluster: SlurmSandbox) -> Any:
    """A job prefix of this test only; its jobs are cancelled at the end."""
    name = "o" + uuid.uuid4().hex[:8]
    yield name
    for service in (SERVICE, SECOND):
        slurm_cluster.run(["scancel", f"--name={name}-{service}"])


def job_status(state_dir: Path, job_id: str) -> dict[str, Any]:
    try:
        status = json.loads((state_dir / "status.json").read_text())
    except (OSError, ValueError):
        return {}
    return next((j for j in status["jobs"] if j["job_id"] == job_id), {})


async def test_drain_hands_over_to_a_replacement_without_a_gap(
    slurm_cluster: SlurmSandbox, prefix: str, tmp_path: Path
) -> None:
    path = tmp_path / "agent.yaml"
    config = write_config(path, slurm_cluster, prefix, [service_data(SERVICE)])
    async with running_agent(config, config_path=path) as registry:
        old = (await until(lambda: registry.ready(SERVICE), 60, "not ready"))[0]
        old.in_flight += 1  # a request still streaming from the old job
        counts: list[int] = []
        sampler = asyncio.create_task(sample_ready(registry, counts))
        try:
            code, out = await saia("hpc", "drain", "-c", str(path), old.job_id)
            assert code == 0, out
            assert out.startswith(f"job {old.job_id}: draining after its replacement is ready")
            new = await until(
                lambda: [b for b in registry.ready(SERVICE) if b.job_id != old.job_id],
                60,
                "no replacement",
            )
            await until(lambda: published(registry).get(old.job_id), 10, "old not draining")
            shown = job_status(config.state_dir, old.job_id)
            assert shown["operator_drain"] == "replace" and shown["draining"]
            assert shown["drain_reason"] == f"operator: replaced by {new[0].job_id}"
            old.in_flight -= 1  # the request finished: now it is cancelled
            ids = await until_async_jobs(config, lambda ids: old.job_id not in ids, 30)
            assert ids == [new[0].job_id]
        finally:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
        assert len(counts) > 50 and min(counts) >= 1, "a moment without a ready backend"


async def test_drain_now_and_drain_of_unknown_jobs(
    slurm_cluster: SlurmSandbox, prefix: str, tmp_path: Path
) -> None:
    path = tmp_path / "agent.yaml"
    config = write_config(path, slurm_cluster, prefix, [service_data(SERVICE)])
    async with running_agent(config, config_path=path) as registry:
        old = (await until(lambda: registry.ready(SERVICE), 60, "not ready"))[0]
        for job, why in (("999999", "is not one of the agent's jobs"), ("../x", "not a job id")):
            code, out = await saia("hpc", "drain", "-c", str(path), job)
            assert code == 1 and len(out.strip().splitlines()) == 1 and why in out, out
        code, out = await saia("hpc", "drain", "-c", str(path), "--service", "nope")
        assert code == 1 and "no service 'nope'" in out
        old.in_flight += 1
        code, out = await saia("hpc", "drain", "-c", str(path), old.job_id, "--now")
        assert code == 0 and "draining at once" in out, out
        # taken out of rotation at once, without waiting for a replacement
        await until(lambda: published(registry).get(old.job_id), 10, "not draining")
        assert registry.ready(SERVICE) == []
        old.in_flight -= 1
        await until_async_jobs(config, lambda ids: old.job_id not in ids, 30)
        fresh = await until(lambda: registry.ready(SERVICE), 60, "no new job")
        assert fresh[0].job_id != old.job_id


async def request_through_router(state_dir: Path, service: str, path: str) -> tuple[int, bytes]:
    """One request over the agent's socket, as the relay sends it."""
    reader, writer = await asyncio.open_unix_connection(str(state_dir / SOCKET_NAME))
    chan = Channel(reader, writer)
    try:
        chan.send(wire.encode_hello())
        assert await chan.read_hello() == wire.VERSION
        method = "GET" if path == "/v1/models" else "POST"
        chat = {"model": service, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
        data = b"" if method == "GET" else json.dumps(chat).encode()
        head = wire.RequestHead(service, method, path, [("content-type", "application/json")])
        chan.send(wire.encode_request(1, head))
        if data:
            chan.send(wire.encode_frame(wire.DATA, 1, data))
        chan.send(wire.encode_frame(wire.END, 1))
        frames: list[wire.Frame] = []
        async with asyncio.timeout(20):
            while not frames or frames[-1].type not in (wire.END, wire.ERROR):
                frame = await next_frame(chan)
                assert frame is not None
                frames.append(frame)
        status = wire.parse_response(frames[0].payload).status
        return status, b"".join(f.payload for f in frames if f.type == wire.DATA)
    finally:
        chan.close()


async def test_reload_adds_then_removes_a_service(
    slurm_cluster: SlurmSandbox, prefix: str, tmp_path: Path
) -> None:
    path = tmp_path / "agent.yaml"
    one = [service_data(SERVICE)]
    config = write_config(path, slurm_cluster, prefix, one)
    async with running_agent(config, config_path=path) as registry:
        await until(lambda: registry.ready(SERVICE), 60, "not ready")
        write_config(path, slurm_cluster, prefix, [*one, service_data(SECOND)])
        code, out = await saia("hpc", "reload", "-c", str(path))
        assert code == 0 and out.strip() == f"config reloaded: services {SERVICE}, {SECOND}", out
        second = (await until(lambda: registry.ready(SECOND), 60, "tiny2 not ready"))[0]
        status, body = await request_through_router(config.state_dir, SECOND, "/v1/models")
        assert status == 200 and json.loads(body)["data"][0]["status"] == "ready"
        status, body = await request_through_router(config.state_dir, SECOND, CHAT)
        assert status == 200 and json.loads(body)["choices"][0]["message"]["content"]

        write_config(path, slurm_cluster, prefix, one)
        os.kill(os.getpid(), signal.SIGHUP)  # the signal path, as a service manager sends it
        await until(lambda: not registry.ready(SECOND), 10, "tiny2 still routed")
        ids = await until_async_jobs(config, lambda ids: second.job_id not in ids, 30)
        assert len(ids) == 1 and registry.ready(SERVICE)
        status, _ = await request_through_router(config.state_dir, SECOND, CHAT)
        assert status == 404  # the router no longer knows the model


async def test_broken_reload_keeps_the_running_config(
    slurm_cluster: SlurmSandbox, prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "agent.yaml"
    config = write_config(path, slurm_cluster, prefix, [service_data(SERVICE)])
    async with running_agent(config, config_path=path) as registry:
        first = (await until(lambda: registry.ready(SERVICE), 60, "not ready"))[0]
        broken = {**service_data(SERVICE), "min_instances": -1}
        good = path.read_text()
        path.write_text(good.replace('"min_instances": 1', '"min_instances": -1'))
        assert json.loads(path.read_text())["services"][0] == broken
        code, out = await saia("hpc", "reload", "-c", str(path))  # refused before signalling
        assert code == 2 and "min_instances" in out, out
        with caplog.at_level(logging.ERROR, logger="hpc.scheduler.operations"):
            os.kill(os.getpid(), signal.SIGHUP)
            await until(lambda: caplog.records, 10, "no error logged")
        (line,) = [r.getMessage() for r in caplog.records]
        assert line.startswith("config reload failed, the running config stays: ")
        assert "min_instances" in line and "\n" not in line
        # a valid file that changes what needs a restart: the CLI reports the agent's refusal
        write_config(path, slurm_cluster, prefix, [service_data(SERVICE)], poll_interval=0.4)
        code, out = await saia("hpc", "reload", "-c", str(path))
        assert code == 1 and "poll_interval: cannot change while the agent runs" in out, out
        await asyncio.sleep(1.0)  # a few loops on the old config: nothing changes
        assert [b.job_id for b in registry.ready(SERVICE)] == [first.job_id]
        assert [j.job_id for j in await our_jobs(config)] == [first.job_id]


async def test_drain_service_replaces_its_jobs_one_at_a_time(
    slurm_cluster: SlurmSandbox, prefix: str, tmp_path: Path
) -> None:
    path = tmp_path / "agent.yaml"
    two = {**service_data(SERVICE), "min_instances": 2, "max_instances": 2}
    config = write_config(path, slurm_cluster, prefix, [two])
    async with running_agent(config, config_path=path) as registry:
        old = await until(
            lambda: len(registry.ready(SERVICE)) == 2 and registry.ready(SERVICE), 60, "not 2 ready"
        )
        old_ids = {b.job_id for b in old}
        draining_at_once: list[int] = []
        ready_at_once: list[int] = []

        async def sample() -> None:
            while True:  # until cancelled; one sample every 20 ms
                draining_at_once.append(sum(published(registry).values()))
                ready_at_once.append(len(registry.ready(SERVICE)))
                await asyncio.sleep(0.02)

        sampler = asyncio.create_task(sample())
        try:
            code, out = await saia("hpc", "drain", "-c", str(path), "--service", SERVICE)
            assert code == 0 and "job by job" in out, out
            ids = await until_async_jobs(config, lambda ids: not old_ids & set(ids), 90)
            assert len(ids) == 2
            await until(lambda: len(registry.ready(SERVICE)) == 2, 30, "not back to 2")
        finally:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
        assert max(draining_at_once) == 1  # each old job drained, never both at once
        assert min(ready_at_once) >= 1, "a moment without a ready backend"
