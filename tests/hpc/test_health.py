"""Backend probes against a real HTTP server on 127.0.0.1, and the health book."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from hpc.health import (
    HealthBook,
    HealthMonitor,
    ProbeResult,
    ProbeTarget,
    probe,
    probe_all,
    read_backend_key,
)
from hpc.jobs import job_dir

Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class Backend:
    """A tiny OpenAI-like server whose answers the test changes while it runs."""

    health_status: int = 200
    models: list[str] = field(default_factory=lambda: ["tiny"])
    delay: float = 0.0
    key: str | None = None
    seen_auth: list[str] = field(default_factory=list)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Send) -> None:
        if scope["type"] != "http":
            return
        auth = dict(scope["headers"]).get(b"authorization", b"").decode()
        self.seen_auth.append(auth)
        await asyncio.sleep(self.delay)
        if self.key and auth != f"Bearer {self.key}":
            await self._reply(send, 401, b'{"error": "unauthorized"}')
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
