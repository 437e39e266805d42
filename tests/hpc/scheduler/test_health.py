"""Backend probes and load reads against real HTTP servers on 127.0.0.1 (an in-process
one the tests steer, and the stand-in model server), the health book, and the agent's
status and scaling snapshot built from them."""

from __future__ import annotations

import asyncio
import io
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from rich.console import Console

from hpc.config import AgentConfig
from hpc.jobs.local import LocalJobSystem
from hpc.jobs.script import render_job
from hpc.jobs.system import JobInfo, JobTag, job_dir
from hpc.registry import BackendRegistry
from hpc.scheduler.agent import Agent
from hpc.scheduler.backend_load import BackendLoad
from hpc.scheduler.health import (
    HealthBook,
    HealthMonitor,
    ProbeResult,
    ProbeTarget,
    probe,
    probe_all,
    read_backend_key,
)
from hpc.scheduler.state import AgentState
from hpc.scheduler.status import read_status, render_status, status_dict, write_status
from tests.fixtures.standin import StandinProcess

Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class Backend:
    """A tiny OpenAI-like server whose answers the test changes while it runs."""

    health_status: int = 200
    models: list[str] = field(default_factory=lambda: ["tiny"])
    delay: float = 0.0
    key: str | None = None
    metrics: str | None = None  # the /metrics text; None: 404
    metrics_delay: float = 0.0
    seen_auth: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Send) -> None:
        if scope["type"] != "http":
            return
        auth = dict(scope["headers"]).get(b"authorization", b"").decode()
        self.seen_auth.append(auth)
        self.paths.append(scope["path"])
        await asyncio.sleep(self.delay)
        if self.key and auth != f"Bearer {self.key}":
            await self._reply(send, 401, b'{"error": "unauthorized"}')
        elif scope["path"] == "/metrics":
            await asyncio.sleep(self.metrics_delay)
            found = self.metrics is not None
            await self._reply(send, 200 if found else 404, (self.metrics or "").encode())
        elif scope["path"] == "/health":
            await self._reply(send, self.health_status, b"")
        elif scope["path"] == "/v1/models":
            data = [{"id": m, "object": "model"} for m in self.models]
            await self._reply(send, 200, json.dumps({"object": "list", "data": data}).encode())
        else:
            await self._reply(send, 404, b"")

    @staticmethod
    async def _reply(send: Send, status: int, body: bytes) -> None:
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture
async def backend() -> AsyncIterator[tuple[Backend, str]]:
    app = Backend()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    for _ in range(500):  # bounded: uvicorn starts in milliseconds
        if server.started:
            break
        await asyncio.sleep(0.01)
    assert server.started, "test backend did not start"
    port = sock.getsockname()[1]
    yield app, f"http://127.0.0.1:{port}"
    server.should_exit = True
    await asyncio.wait_for(task, 10)
    sock.close()


async def test_ready_needs_health_and_model(backend: tuple[Backend, str]) -> None:
    app, url = backend
    target = ProbeTarget(job_id="1", url=url, model_id="tiny")
    async with httpx.AsyncClient() as client:
        assert await probe(client, target, 2) == ProbeResult("1", True, "")
        app.models = ["other"]
        assert await probe(client, target, 2) == ProbeResult("1", False, "/v1/models lacks 'tiny'")
        # once ready, only liveness is checked
        ready = ProbeTarget(job_id="1", url=url, model_id="tiny", ready=True)
        assert (await probe(client, ready, 2)).ok
        app.health_status = 503
        assert await probe(client, ready, 2) == ProbeResult("1", False, "/health answered 503")


async def test_api_key_is_sent_when_the_job_has_one(
    backend: tuple[Backend, str], tmp_path: Path
) -> None:
    app, url = backend
    app.key = "s3cret"
    (job_dir(tmp_path, "5")).mkdir(parents=True)
    (job_dir(tmp_path, "5") / "api_key").write_text("s3cret\n")
    (job_dir(tmp_path, "5") / "api_key").chmod(0o600)  # as a job writes it
    key = read_backend_key(tmp_path, "5")
    assert key == "s3cret" and read_backend_key(tmp_path, "6") is None
    async with httpx.AsyncClient() as client:
        without = await probe(client, ProbeTarget("5", url, "tiny"), 2)
        assert without == ProbeResult("5", False, "/health answered 401")
        assert (await probe(client, ProbeTarget("5", url, "tiny", api_key=key), 2)).ok
    assert app.seen_auth[-1] == "Bearer s3cret"


async def test_slow_and_dead_backends_fail_within_the_timeout(
    backend: tuple[Backend, str],
) -> None:
    app, url = backend
    app.delay = 1.0
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    dead_url = f"http://127.0.0.1:{free.getsockname()[1]}"
    free.close()  # nothing listens there now
    targets = [ProbeTarget("slow", url, "tiny"), ProbeTarget("dead", dead_url, "tiny")]
    async with httpx.AsyncClient() as client:
        loop = asyncio.get_running_loop()
        started = loop.time()
        results = await probe_all(client, targets, 0.2)
        elapsed = loop.time() - started
    assert [(r.job_id, r.ok) for r in results] == [("slow", False), ("dead", False)]
    assert results[0].detail == "no answer within 0.2s"
    assert results[1].detail.startswith("ConnectError")
    assert elapsed < 0.9  # concurrent and bounded by the timeout, not the 1 s delay


def test_health_book_readiness_and_failure_threshold() -> None:
    book = HealthBook(threshold=2)
    assert not book.record(ProbeResult("1", False, "down"), 1.0)
    assert book.get("1").ready_since is None
    assert book.record(ProbeResult("1", True), 2.0)  # became ready
    assert book.get("1").ready_since == 2.0 and book.serving("1")
    assert not book.record(ProbeResult("1", False, "x"), 3.0)
    assert book.serving("1")  # one failure is tolerated
    assert not book.record(ProbeResult("1", True), 4.0)
    assert book.get("1").failures == 0
    book.record(ProbeResult("1", False, "x"), 5.0)
    assert book.record(ProbeResult("1", False, "y"), 6.0)  # crossed the threshold
    assert not book.serving("1") and book.get("1").detail == "y"
    book.forget("1")
    assert book.known() == set() and not book.serving("1")


def test_health_book_seeded_from_state() -> None:
    book = HealthBook(threshold=3)
    book.seed("9", 50.0)
    assert book.serving("9")
    assert not book.record(ProbeResult("9", True), 60.0)
    assert book.get("9").ready_since == 50.0


async def test_monitor_wakes_the_scheduler_when_a_job_becomes_ready(
    backend: tuple[Backend, str],
) -> None:
    _app, url = backend
    book = HealthBook(threshold=2)
    book.get("1")  # a job the agent tracks
    woken = asyncio.Event()
    targets = [ProbeTarget("1", url, "tiny"), ProbeTarget("gone", url, "tiny")]
    monitor = HealthMonitor(book, lambda: targets, woken.set, 0.05, 1.0, lambda: 7.0)
    async with httpx.AsyncClient() as client:
        task = asyncio.create_task(monitor.run(client))
        try:
            await asyncio.wait_for(woken.wait(), 5)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert book.get("1").ready_since == 7.0
    assert book.known() == {"1"}  # a result for a job nobody tracks is dropped


VLLM_TEXT = """# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 1.0
vllm:num_requests_waiting{engine="0",model_name="tiny"} 2.0
vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.25
"""


async def test_round_reads_ready_jobs_load_and_a_failed_read_is_no_health_failure(
    backend: tuple[Backend, str],
) -> None:
    app, url = backend
    app.key = "k"
    book = HealthBook(threshold=2)
    book.seed("ready", 1.0)
    book.get("starting")
    targets = [
        ProbeTarget("ready", url, "tiny", api_key="k", ready=True),
        ProbeTarget("starting", url, "tiny", api_key="k"),
    ]
    monitor = HealthMonitor(book, lambda: targets, lambda: None, 0.05, 0.3, lambda: 9.0)
    async with httpx.AsyncClient() as client:
        app.metrics = VLLM_TEXT
        await monitor.round(client, targets)
        assert book.get("ready").load == BackendLoad(running=1, waiting=2, kv_cache_usage=0.25)
        assert book.get("starting").load is None  # not ready: not read
        assert app.paths.count("/metrics") == 1
        assert all(auth == "Bearer k" for auth in app.seen_auth)
        failures = [
            (None, "/metrics answered 404"),
            ("# no vllm here\nother_metric 1\n", "/metrics has no vLLM load figures"),
        ]
        for text, problem in failures:
            app.metrics = text
            for _ in range(3):  # more rounds than the failure threshold
                await monitor.round(client, targets)
            record = book.get("ready")
            assert (record.load, record.load_problem) == (None, problem)
            assert record.failures == 0 and book.serving("ready")
        app.metrics, app.metrics_delay = VLLM_TEXT, 1.0  # /metrics hangs, /health answers
        for _ in range(3):
            await monitor.round(client, targets)
        assert book.get("ready").load_problem == "/metrics: no answer within 0.3s"
        assert book.serving("ready") and book.get("ready").failures == 0
        app.metrics_delay = 0.0
        await monitor.round(client, targets)
        assert book.get("ready").load is not None and book.get("ready").load_problem == ""


def agent_on(state_dir: Path) -> Agent:
    config = AgentConfig.model_validate(
        {
            "state_dir": state_dir,
            "executor": "local",
            "health_timeout": 2,
            "services": [{"name": "tiny", "model": "tiny", "template": "standin"}],
        }
    )
    tag = JobTag(config.job_prefix, "test")
    return Agent(
        config,
        LocalJobSystem(config, tag),  # not called: the test hands the agent its job list
        BackendRegistry(),
        AgentState(agent_id="test"),
        render=lambda service: render_job(service, config, tag),
    )


def running_job(state_dir: Path, job_id: str, port: int, key: str | None) -> JobInfo:
    """A job whose server listens on `port`, as a job writes it (endpoint.json, api_key)."""
    folder = job_dir(state_dir, job_id)
    folder.mkdir(parents=True)
    (folder / "endpoint.json").write_text(json.dumps({"host": "127.0.0.1", "port": port}))
    (folder / "endpoint.json").chmod(0o600)  # the agent trusts only its own 0600 files
    if key:
        (folder / "api_key").write_text(key)
        (folder / "api_key").chmod(0o600)
    return JobInfo(job_id, "tiny", "RUNNING", 3600, 3500, 1.0, 1.0, ("n1",), "")


async def stream_chat(client: httpx.AsyncClient, url: str, key: str) -> None:
    """One long streamed request, read until cancelled (the stand-in then stops it)."""
    prompt = " ".join(["word"] * 400)  # 400 tokens at 0.05 s: 20 s, far beyond the test
    body = {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "stream": True}
    headers = {"Authorization": f"Bearer {key}"}
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers):
        await asyncio.Event().wait()


async def rounds_until(agent: Agent, client: httpx.AsyncClient, job_id: str, want: Any) -> None:
    monitor = agent.health_monitor()
    async with asyncio.timeout(10):
        while agent.live.health.get(job_id).load != want:
            await monitor.round(client, agent.probe_targets())
            await asyncio.sleep(0.05)


async def test_agent_status_and_snapshot_show_the_backends_own_load(
    backend: tuple[Backend, str],
    standin_factory: Callable[..., StandinProcess],
    tmp_path: Path,
) -> None:
    """Requests sent to a stand-in past the router (1 running, 2 waiting with
    --max-running 1) make the scaling load 3; a backend without /metrics stays ready."""
    _app, no_metrics_url = backend  # answers /health and /v1/models, 404 on /metrics
    busy = standin_factory("tiny", max_running=1, token_delay=0.05, api_key="k1")
    agent = agent_on(tmp_path)
    infos = [
        running_job(tmp_path, "local-1", busy.port, "k1"),
        running_job(tmp_path, "local-2", int(no_metrics_url.rsplit(":", 1)[1]), None),
    ]
    agent.observe(infos, 100.0)
    async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
        await rounds_until(agent, client, "local-1", BackendLoad(0, 0, None))
        assert agent.live.health.serving("local-1") and agent.live.health.serving("local-2")
        requests = [asyncio.create_task(stream_chat(client, busy.url, "k1")) for _ in range(3)]
        try:
            await rounds_until(agent, client, "local-1", BackendLoad(1, 2, None))
            snapshot = agent.observe(infos, 101.0)
            status = agent.status(101.0)
        finally:
            for request in requests:
                request.cancel()
            await asyncio.gather(*requests, return_exceptions=True)
        sample = snapshot.services[0].load[-1]
        assert (sample.routed, sample.in_backends, sample.load) == (0, 3, 3)
        assert (
            agent.live.health.serving("local-2") and agent.live.health.get("local-2").failures == 0
        )
        # the stand-in stops the cancelled streams: the figures follow
        await rounds_until(agent, client, "local-1", BackendLoad(0, 0, None))
    jobs = {j.job_id: j for j in status.jobs}
    assert (jobs["local-1"].running, jobs["local-1"].waiting, jobs["local-1"].ready) == (1, 2, True)
    assert (jobs["local-2"].running, jobs["local-2"].ready) == (None, True)
    assert jobs["local-2"].metrics == "/metrics answered 404"
    service = status.services[0]
    assert (service.running, service.waiting, service.load, service.ready) == (1, 2, 3, 2)
    # what `saia hpc status` shows, from the file the agent writes
    write_status(tmp_path, status)
    shown = read_status(tmp_path)
    assert shown == status
    console = Console(width=100, record=True, file=io.StringIO())
    console.print(render_status(shown, now=101.0))
    text = console.export_text()
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in text.splitlines()]
    assert ["tiny", "local-1", "1", "2", "-", ""] in rows  # service, job, run, wait, kv, load
    assert ["tiny", "local-2", "-", "-", "-", ""] in rows
    assert ["tiny", "total", "1", "2", "-", "3"] in rows
    assert "/metrics answered 404" in text  # the job's note
    as_json = status_dict(shown, 101.0)
    assert [(j["running"], j["waiting"]) for j in as_json["jobs"]] == [(1, 2), (None, None)]
    assert as_json["services"][0]["load"] == 3
