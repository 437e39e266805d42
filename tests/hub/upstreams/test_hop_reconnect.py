"""A dropped SSH connection (its sshd session process killed): the hub reconnects at once,
requests whose answer had not started are sent again on the new connection, those cut
mid-answer fail mid-stream, and nothing hangs. Real sshd, relay, router and stand-in.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from cloud_interface.relay import SOCKET_NAME
from hpc.config import AgentConfig, ServiceConfig
from hpc.registry import Backend, BackendRegistry
from hpc.router.server import serve_requests
from hub.config import HpcSite, HpcUpstreamConfig, TimeoutsConfig
from hub.upstreams.base import UpstreamError, UpstreamRequest
from hub.upstreams.hop_client import HopClient, HopTarget
from hub.upstreams.hpc import HpcUpstream
from saia.sandbox.sshd import SshdSandbox
from tests.fixtures.standin import StandinProcess
from tests.hpc.helpers import until

pytestmark = pytest.mark.ssh

MODEL = "reconnect-model"
CHAT = "/v1/chat/completions"
PROMPT = " ".join(f"w{i}" for i in range(200))  # the stand-in echoes the prompt's words


def chat(tokens: int, stream: bool = True) -> bytes:
    message = {"role": "user", "content": PROMPT}
    body = {"model": MODEL, "max_tokens": tokens, "stream": stream, "messages": [message]}
    return json.dumps(body).encode()


@asynccontextmanager
async def router(sshd: SshdSandbox, registry: BackendRegistry) -> AsyncIterator[None]:
    config = AgentConfig(
        state_dir=sshd.state_dir, services=[ServiceConfig(name=MODEL, model=MODEL)]
    )
    task = asyncio.create_task(serve_requests(config, registry))
    await until((sshd.state_dir / SOCKET_NAME).exists, 30, "the router's socket")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def drop_connection(sshd: SshdSandbox) -> list[int]:
    """SIGKILL the sshd session processes (the hub's connection drops, sshd keeps running)."""
    sessions = sshd.session_pids()
    assert sessions, "no sshd session to kill"
    for pid in sessions:
        os.kill(pid, signal.SIGKILL)
    return sessions


def relays(state_dir: Path) -> list[int]:
    """Relay processes of this state dir (their argv names it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(state_dir).encode() in argv and any(b"relay" in a for a in argv):
                found.append(int(entry.name))
    return found


def upstream_config(sshd: SshdSandbox) -> HpcUpstreamConfig:
    site = HpcSite(
        host=sshd.host,
        port=sshd.port,
        user=sshd.user,
        client_key=sshd.client_key,
        known_hosts=sshd.known_hosts,
    )
    timeouts = TimeoutsConfig(connect=10, first_byte=60, idle=30)
    return HpcUpstreamConfig(kind="hpc", sites=[site], timeouts=timeouts, services_ttl=0)


@pytest.mark.faults
async def test_a_killed_session_is_replaced_and_serves(
    sshd: SshdSandbox, standin_factory: Callable[..., StandinProcess]
) -> None:
    registry = BackendRegistry()
    server = standin_factory(MODEL)
    registry.publish(MODEL, [Backend(MODEL, "job-1", server.url)])
    target = HopTarget(sshd.host, sshd.port, sshd.user, sshd.client_key, sshd.known_hosts)
    async with router(sshd, registry), HopClient(target, connect_timeout=10) as client:
        assert len(await client.services()) == 1
        first = client._links[0]
        old = drop_connection(sshd)
        dropped = time.monotonic()
        await until(lambda: client._links[0] not in (None, first), 10, "no new connection", 0.01)
        print(f"reconnected {time.monotonic() - dropped:.2f}s after the session was killed")
        assert (await client.services())[0]["id"] == MODEL  # served on the new connection
        assert not set(old) & set(sshd.session_pids())
        await until(lambda: len(relays(sshd.state_dir)) == 1, 10, "the old relay still runs")


@pytest.mark.faults
async def test_requests_not_yet_answered_are_sent_again_after_a_drop(
    sshd: SshdSandbox, standin_factory: Callable[..., StandinProcess]
) -> None:
    """Queued requests (no backend yet) survive the drop; a stream mid-answer fails fast."""
    registry = BackendRegistry()
    slow = standin_factory(MODEL, token_delay=0.05)
    registry.publish(MODEL, [Backend(MODEL, "job-slow", slow.url)])
    async with router(sshd, registry), HpcUpstream("cluster", upstream_config(sshd)) as hpc:

        async def ask(index: int, tokens: int) -> tuple[int, bytes]:
            request = UpstreamRequest("POST", CHAT, chat(tokens), MODEL, f"r{index}")
            async with hpc.stream(request) as response:
                body = b"".join([chunk async for chunk in response.chunks])
            return response.status, body

        streaming = asyncio.create_task(ask(0, 200))  # 200 tokens at 50 ms: ~10 s
        await until(lambda: registry.in_flight_of(MODEL, "job-slow"), 30, "no stream")
        registry.publish(MODEL, [])  # new requests now wait in the router's queue
        waiting = [asyncio.create_task(ask(i, 5)) for i in range(1, 5)]
        await until(lambda: registry.queued(MODEL) == 4, 30, "requests not queued")
        drop_connection(sshd)
        with pytest.raises(UpstreamError):  # mid-answer: cannot be replayed
            await asyncio.wait_for(streaming, 20)
        fast = standin_factory(MODEL)
        registry.publish(MODEL, [Backend(MODEL, "job-fast", fast.url)])
        answers = await asyncio.wait_for(asyncio.gather(*waiting), 60)
    assert [status for status, _ in answers] == [200] * 4
    assert all(b"[DONE]" in body for _, body in answers)


@pytest.mark.faults
async def test_a_stopped_relay_is_found_by_a_ping_and_its_link_replaced(
    sshd: SshdSandbox, standin_factory: Callable[..., StandinProcess]
) -> None:
    """A relay that stops (SIGSTOP: the TCP connection and sshd stay up and answer SSH
    keepalives, so only the hop's own PING sees it): the request waiting on it is asked
    again on a new connection once the PING went unanswered, instead of hanging."""
    registry = BackendRegistry()
    registry.publish(MODEL, [Backend(MODEL, "job-1", standin_factory(MODEL).url)])
    target = HopTarget(sshd.host, sshd.port, sshd.user, sshd.client_key, sshd.known_hosts)
    probe = (1.0, 2.0)  # silence before the PING, time for its answer
    async with router(sshd, registry), HopClient(target, probe=probe) as client:
        assert len(await client.services()) == 1
        first = client._links[0]
        [stuck] = relays(sshd.state_dir)
        os.kill(stuck, signal.SIGSTOP)
        try:
            stopped = time.monotonic()
            waiting = asyncio.create_task(client.services())  # its stream waits on `first`
            await until(lambda: client._links[0] not in (None, first), 20, "link kept", 0.01)
            replaced = time.monotonic() - stopped
            print(f"silent link replaced {replaced:.2f}s after its relay stopped")
            assert replaced >= sum(probe)  # found by the unanswered PING, not by chance
            assert (await asyncio.wait_for(waiting, 20))[0]["id"] == MODEL
        finally:
            os.kill(stuck, signal.SIGKILL)
