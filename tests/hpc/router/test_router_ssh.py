"""The whole hop against real components: HopClient -> sshd (forced command) -> relay ->
the agent's router (in-process, on a registry the test publishes into) -> stand-in servers.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cloud_interface.relay import SOCKET_NAME
from hpc.config import AgentConfig, FairnessConfig, RouterConfig, ServiceConfig
from hpc.registry import Backend, BackendRegistry
from hpc.router.server import serve_requests
from hub.upstreams.hop_client import HopClient, HopError, HopTarget
from saia.sandbox.sshd import SshdSandbox
from tests.fixtures.standin import StandinProcess

pytestmark = pytest.mark.ssh

MODEL = "hop-model"
CHAT = "/v1/chat/completions"
JSON = [("content-type", "application/json")]


LONG_PROMPT = " ".join(f"w{i}" for i in range(200))  # the stand-in echoes the prompt's words


def chat_body(words: int, stream: bool = True, text: str = LONG_PROMPT) -> bytes:
    body = {
        "model": MODEL,
        "stream": stream,
        "max_tokens": words,
        "messages": [{"role": "user", "content": text}],
    }
    return json.dumps(body).encode()


async def until(condition: Callable[[], bool], limit: float = 10) -> None:
    """Poll state owned by another component (no event to wait on), bounded."""
    async with asyncio.timeout(limit):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


@dataclass
class Hop:
    client: HopClient
    registry: BackendRegistry
    config: AgentConfig

    def publish(self, *servers: StandinProcess) -> None:
        backends = [Backend(MODEL, f"job-{s.port}", s.url) for s in servers]
        self.registry.publish(MODEL, backends)


def target_of(sshd: SshdSandbox, connections: int = 1) -> HopTarget:
    return HopTarget(
        sshd.host, sshd.port, sshd.user, sshd.client_key, sshd.known_hosts, connections=connections
    )


@asynccontextmanager
async def running_router(config: AgentConfig, registry: BackendRegistry) -> AsyncIterator[None]:
    task = asyncio.create_task(serve_requests(config, registry))
    socket_path = config.state_dir / SOCKET_NAME
    await until(socket_path.exists)
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@asynccontextmanager
async def hop_chain(sshd: SshdSandbox, **router: Any) -> AsyncIterator[Hop]:
    config = AgentConfig(
        state_dir=sshd.state_dir,
        services=[ServiceConfig(name=MODEL, model=MODEL, display_name="Hop model")],
        router=RouterConfig(**router),
    )
    registry = BackendRegistry()
    async with running_router(config, registry), HopClient(target_of(sshd)) as client:
        yield Hop(client, registry, config)


async def collect(client: HopClient, body: bytes, service: str = MODEL) -> tuple[int, bytes]:
    async with client.stream(service, "POST", CHAT, JSON, body, first_byte_timeout=30) as r:
        return r.status, b"".join([chunk async for chunk in r.aiter_bytes()])


async def test_streamed_answer_arrives_chunk_by_chunk(
    sshd: SshdSandbox, standin_factory: Callable[..., StandinProcess]
) -> None:
    async with hop_chain(sshd) as hop:
        hop.publish(standin_factory(MODEL, token_delay=0.2))
        arrivals: list[tuple[float, bytes]] = []
        async with hop.client.stream(
            MODEL, "POST", CHAT, JSON, chat_body(6), first_byte_timeout=30
        ) as response:
            assert response.status == 200
            async for chunk in response.aiter_bytes():
                arrivals.append((time.monotonic(), chunk))
        text = b"".join(chunk for _, chunk in arrivals)
        assert text.rstrip().endswith(b"data: [DONE]")
        assert len(arrivals) >= 6
        assert arrivals[-1][0] - arrivals[0][0] >= 0.8  # the first came ~1 s before the last


async def test_services_and_models_are_answered_by_the_agent(
    sshd: SshdSandbox, standin_factory: Callable[..., StandinProcess]
) -> None:
    async with hop_chain(sshd) as hop:
        (offline,) = await hop.client.services()
        assert (offline["id"], offline["name"], offline["status"]) == (
            MODEL,
            "Hop model",
            "offline",
        )
        hop.publish(standin_factory(MODEL))
        (ready,) = await hop.client.services()
        assert ready["status"] == "ready"
        assert ready["input"] == ["text"]
        async with hop.client.stream("", "GET", "/v1/models", [], b"", first_byte_timeout=10) as r:
            listing = json.loads(b"".join([c async for c in r.aiter_bytes()]))
        assert [m["id"] for m in listing["data"]] == [MODEL]


async def test_500_concurrent_streams_over_one_connection(
    sshd: SshdSandbox, standin_factory: Callable[..., StandinProcess]
) -> None:
    # One caller's 500 streams: transport capacity, not queue limits (defaults 256, 128).
    fairness = FairnessConfig(max_queue_per_user=500)
    async with hop_chain(sshd, max_queue=500, fairness=fairness) as hop:
        hop.publish(standin_factory(MODEL, token_delay=0.01))

        async def one() -> tuple[int, bytes]:
            return await collect(hop.client, chat_body(3))

        async with asyncio.timeout(50):
            results = await asyncio.gather(*(one() for _ in range(500)))
        bad = [body[:300] for status, body in results if status != 200][:3]
        assert [status for status, _ in results] == [200] * 500, bad
        assert all(body.rstrip().endswith(b"[DONE]") for _, body in results)
        assert all(b'"object":"error"' not in body for _, body in results)
        assert "MaxSessions" not in sshd.config_path.read_text()


async def test_cancelled_streams_release_everything(
    sshd: SshdSandbox, standin_factory: Callable[..., StandinProcess]
) -> None:
    async with hop_chain(sshd) as hop:
        hop.publish(standin_factory(MODEL, token_delay=0.05))
        backend = hop.registry.ready(MODEL)[0]
        assert (await collect(hop.client, chat_body(1)))[0] == 200  # connected
        before = asyncio.all_tasks()
        started = asyncio.Event()
        count = 0

        async def reader() -> None:
            nonlocal count
            async with hop.client.stream(
                MODEL, "POST", CHAT, JSON, chat_body(200), first_byte_timeout=30
            ) as response:
                async for _chunk in response.aiter_bytes():
                    count += 1
                    if count >= 100:
                        started.set()

        tasks = [asyncio.create_task(reader()) for _ in range(100)]
        async with asyncio.timeout(30):
            await started.wait()
        assert backend.in_flight > 0
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await until(lambda: backend.in_flight == 0)
        links = [link for link in hop.client._links if link is not None]
        assert [len(link.channel.streams) for link in links] == [0]
        await asyncio.sleep(0.1)
        assert asyncio.all_tasks() - before == set()
        status, body = await collect(hop.client, chat_body(2, stream=False))
        assert status == 200, body


async def test_cold_start_waits_for_a_backend_then_503(
    sshd: SshdSandbox, standin_factory: Callable[..., StandinProcess]
) -> None:
    server = standin_factory(MODEL)
    async with hop_chain(sshd, queue_timeout=20) as hop:
        waiting = asyncio.create_task(collect(hop.client, chat_body(2, stream=False)))
        await until(lambda: hop.registry.queued(MODEL) > 0)
        assert hop.registry.demand_since(MODEL) is not None
        (service,) = await hop.client.services()
        assert service["status"] == "loading"
        hop.publish(server)
        status, body = await asyncio.wait_for(waiting, 20)
        assert status == 200, body
    async with hop_chain(sshd, queue_timeout=0.5) as hop:
        async with hop.client.stream(
            MODEL, "POST", CHAT, JSON, chat_body(2), first_byte_timeout=10
        ) as response:
            body = b"".join([c async for c in response.aiter_bytes()])
        assert response.status == 503
        assert dict(response.headers)["retry-after"].isdigit()
        assert "retry later" in json.loads(body)["error"]["message"]


async def test_full_queue_is_refused_at_once(sshd: SshdSandbox) -> None:
    async with hop_chain(sshd, queue_timeout=30, max_queue=2) as hop:
        waiting = [asyncio.create_task(collect(hop.client, chat_body(1))) for _ in range(2)]
        await until(lambda: hop.registry.queued(MODEL) == 2)
        status, body = await collect(hop.client, chat_body(1))
        assert status == 503
        assert json.loads(body)["error"]["code"] == "queue_full"
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)


async def test_killed_backend_requests_move_to_the_other(
    sshd: SshdSandbox, standin_factory: Callable[..., StandinProcess]
) -> None:
    async with hop_chain(sshd) as hop:
        doomed = standin_factory(MODEL, token_delay=0.05)
        survivor = standin_factory(MODEL, token_delay=0.05)
        hop.publish(doomed, survivor)
        assert (await collect(hop.client, chat_body(1)))[0] == 200  # connected
        running = [asyncio.create_task(collect(hop.client, chat_body(40))) for _ in range(10)]
        await until(lambda: hop.registry.in_flight_of(MODEL, f"job-{doomed.port}") >= 5)
        await asyncio.sleep(0.3)  # streaming by now
        os.kill(doomed.pid, signal.SIGKILL)
        doomed.proc.wait(10)
        later = [collect(hop.client, chat_body(3, stream=False)) for _ in range(10)]
        async with asyncio.timeout(30):
            after = await asyncio.gather(*later)
            during = await asyncio.gather(*running)
        assert [status for status, _ in after] == [200] * 10  # retried on the survivor
        broken = [body for _, body in during if b'"object": "error"' in body]
        whole = [body for _, body in during if body.rstrip().endswith(b"[DONE]")]
        assert len(broken) + len(whole) == 10  # each one ended explicitly, none truncated
        assert broken, "the killed backend had streams in progress"


async def test_requests_are_checked_before_forwarding(
    sshd: SshdSandbox, standin_factory: Callable[..., StandinProcess]
) -> None:
    async with hop_chain(sshd, max_body_bytes=4096) as hop:
        hop.publish(standin_factory(MODEL))
        cases = [
            ("unknown-model", "POST", CHAT, 404, "model_not_found"),
            (MODEL, "POST", "http://127.0.0.1:1/v1/chat/completions", 404, "unknown_endpoint"),
            (MODEL, "POST", "//127.0.0.1:1/v1/chat/completions", 404, "unknown_endpoint"),
            (MODEL, "POST", "/v1/chat/completions/../../admin", 404, "unknown_endpoint"),
            (MODEL, "POST", "/v1/chat/completions?x=@127.0.0.1:1", 404, "unknown_endpoint"),
            (MODEL, "DELETE", "/v1/models", 405, "method_not_allowed"),
            ("", "POST", CHAT, 400, "model_missing"),
        ]
        for service, method, path, status, code in cases:
            async with hop.client.stream(
                service, method, path, JSON, chat_body(1), first_byte_timeout=10
            ) as response:
                body = b"".join([c async for c in response.aiter_bytes()])
            assert (response.status, json.loads(body)["error"]["code"]) == (status, code), path
        status, body = await collect(hop.client, chat_body(1, text="x" * 5000))
        assert (status, json.loads(body)["error"]["code"]) == (413, "request_too_large")
        smuggling = [("host", "127.0.0.1:1"), ("authorization", "Bearer stolen"), *JSON]
        async with hop.client.stream(
            MODEL, "POST", CHAT, smuggling, chat_body(1, stream=False), first_byte_timeout=10
        ) as response:
            assert response.status == 200


async def test_agent_gone_fails_in_flight_then_reconnects(
    sshd: SshdSandbox, standin_factory: Callable[..., StandinProcess]
) -> None:
    config = AgentConfig(
        state_dir=sshd.state_dir, services=[ServiceConfig(name=MODEL, model=MODEL)]
    )
    registry = BackendRegistry()
    registry.publish(MODEL, [Backend(MODEL, "j", standin_factory(MODEL, token_delay=0.1).url)])
    async with HopClient(target_of(sshd), connect_timeout=5) as client:
        async with running_router(config, registry):
            slow = asyncio.create_task(collect(client, chat_body(50)))
            await asyncio.sleep(0.5)
        with pytest.raises(HopError):
            await asyncio.wait_for(slow, 10)
        async with running_router(config, registry):
            async with asyncio.timeout(20):
                while True:  # the client reconnects with back-off
                    try:
                        status, _ = await collect(client, chat_body(1, stream=False))
                        break
                    except HopError:
                        await asyncio.sleep(0.2)
            assert status == 200


def test_state_dir_socket_is_private(sshd: SshdSandbox) -> None:
    async def check() -> int:
        config = AgentConfig(state_dir=sshd.state_dir)
        async with running_router(config, BackendRegistry()):
            return os.stat(Path(sshd.state_dir) / SOCKET_NAME).st_mode & 0o777

    assert asyncio.run(check()) == 0o600
