"""HopClient against the real sshd, relay and router: host key pinning, several connections,
failures before the response (retryable) and reconnection.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from hpc.config import AgentConfig, ServiceConfig
from hpc.registry import Backend, BackendRegistry
from hpc.router.server import SOCKET_NAME, serve_requests
from hub.upstreams.hop_client import HopClient, HopTarget, HopTimeout, HopUnavailable
from saia.sandbox.sshd import SshdSandbox
from tests.fixtures.standin import StandinProcess

pytestmark = pytest.mark.ssh

MODEL = "client-model"
CHAT = "/v1/chat/completions"
JSON = [("content-type", "application/json")]
PROMPT = " ".join(f"w{i}" for i in range(100))


def chat(tokens: int, stream: bool = True) -> bytes:
    message = {"role": "user", "content": PROMPT}
    return json.dumps(
        {"model": MODEL, "max_tokens": tokens, "stream": stream, "messages": [message]}
    ).encode()


def target(sshd: SshdSandbox, **changes: object) -> HopTarget:
    fields: dict[str, object] = dict(
        host=sshd.host,
        port=sshd.port,
        user=sshd.user,
        client_key=sshd.client_key,
        known_hosts=sshd.known_hosts,
    )
    fields.update(changes)
    return HopTarget(**fields)  # type: ignore[arg-type]


@asynccontextmanager
async def agent_router(sshd: SshdSandbox, *servers: StandinProcess) -> AsyncIterator[None]:
    config = AgentConfig(
        state_dir=sshd.state_dir, services=[ServiceConfig(name=MODEL, model=MODEL)]
    )
    registry = BackendRegistry()
    registry.publish(MODEL, [Backend(MODEL, f"j{s.port}", s.url) for s in servers])
    task = asyncio.create_task(serve_requests(config, registry))
    async with asyncio.timeout(10):
        while not (sshd.state_dir / SOCKET_NAME).exists():  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def complete(client: HopClient, body: bytes, first_byte_timeout: float = 30) -> int:
    async with client.stream(
        MODEL, "POST", CHAT, JSON, body, first_byte_timeout=first_byte_timeout
    ) as response:
        async for _chunk in response.aiter_bytes():
            pass
    return response.status


@pytest.fixture
def impostor_known_hosts(sshd: SshdSandbox, tmp_path: Path) -> Path:
    """known_hosts pinning another key for the sandbox's address."""
    impostor = tmp_path / "impostor"
    argv = ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(impostor)]
    subprocess.run(argv, check=True, timeout=30)
    known = tmp_path / "known_hosts"
    key = impostor.with_suffix(".pub").read_text().split()
    known.write_text(f"[{sshd.host}]:{sshd.port} {key[0]} {key[1]}\n")
    return known


async def test_a_wrong_host_key_is_never_accepted(
    sshd: SshdSandbox, impostor_known_hosts: Path
) -> None:
    wrong = target(sshd, known_hosts=impostor_known_hosts)
    async with agent_router(sshd), HopClient(wrong, connect_timeout=2) as client:
        with pytest.raises(HopUnavailable):
            await client.services()
    assert "Accepted publickey" not in sshd.log_path.read_text()


async def test_streams_spread_over_several_connections(
    sshd: SshdSandbox, standin_factory: Callable[..., StandinProcess]
) -> None:
    async with (
        agent_router(sshd, standin_factory(MODEL, token_delay=0.05)),
        HopClient(target(sshd, connections=2)) as client,
    ):
        async with asyncio.timeout(20):  # both connections come up
            while len([k for k in client._links if k is not None]) < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        tasks = [asyncio.create_task(complete(client, chat(20))) for _ in range(10)]
        await asyncio.sleep(0.3)
        counts = [len(link.channel.streams) for link in client._links if link is not None]
        assert len(counts) == 2 and min(counts) >= 3, counts
        assert await asyncio.gather(*tasks) == [200] * 10


async def test_loss_before_the_response_is_retryable(sshd: SshdSandbox) -> None:
    async with HopClient(target(sshd), connect_timeout=5) as client:
        async with agent_router(sshd):  # no backend: the request waits in the queue
            waiting = asyncio.create_task(complete(client, chat(1)))
            await asyncio.sleep(1.0)
        with pytest.raises(HopUnavailable):
            await asyncio.wait_for(waiting, 10)


async def test_first_byte_timeout(sshd: SshdSandbox) -> None:
    async with agent_router(sshd), HopClient(target(sshd)) as client:
        with pytest.raises(HopTimeout):
            await complete(client, chat(1), first_byte_timeout=1)


async def test_requests_wait_for_the_connection_to_come_up(
    sshd: SshdSandbox, standin_factory: Callable[..., StandinProcess]
) -> None:
    server = standin_factory(MODEL)
    async with HopClient(target(sshd), connect_timeout=15) as client:
        first = asyncio.create_task(complete(client, chat(1, stream=False)))
        await asyncio.sleep(1.0)  # the relay refuses: no agent yet; the client backs off
        assert not first.done()
        async with agent_router(sshd, server):
            assert await asyncio.wait_for(first, 20) == 200


async def test_refusal_reason_is_reported(sshd: SshdSandbox) -> None:
    async with HopClient(target(sshd, command="saia-relay 7"), connect_timeout=2) as client:
        with pytest.raises(HopUnavailable, match="unsupported saia-relay protocol version"):
            await client.services()
