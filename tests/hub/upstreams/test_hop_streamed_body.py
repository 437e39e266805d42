"""A request body that streams in (an audio upload) through HopClient, the real sshd, relay
and router to a stand-in: sent piece by piece under the mux's flow control, the first-byte
timeout held while the client is still sending; a body that fails midway cancels its
stream at the agent and leaves the connection serving."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import pytest

from hub.upstreams.hop_client import HopClient
from saia.sandbox.sshd import SshdSandbox
from tests.fixtures.standin import StandinProcess
from tests.hub.upstreams.test_ssh_client import CHAT, JSON, MODEL, agent_router, chat, target

pytestmark = pytest.mark.ssh
WORDS = 60_000  # a body of about 500 kB: several windows of the agent's credit


async def paced(body: bytes, pieces: int, pause: float, fail: bool = False) -> AsyncIterator[bytes]:
    size = -(-len(body) // pieces)
    for start in range(0, len(body), size):
        await asyncio.sleep(pause)
        if fail and start > len(body) // 2:
            raise ConnectionResetError("the client went away")
        yield body[start : start + size]


def big_chat() -> bytes:
    message = {"role": "user", "content": " ".join(f"w{i}" for i in range(WORDS))}
    return json.dumps({"model": MODEL, "max_tokens": 2, "messages": [message]}).encode()


async def test_a_streamed_body_arrives_whole_after_the_first_byte_timeout(
    sshd: SshdSandbox, standin_factory: Callable[..., StandinProcess]
) -> None:
    """20 pieces, 0.1 s apart: 2 s of sending, twice the first-byte timeout."""
    async with agent_router(sshd, standin_factory(MODEL)), HopClient(target(sshd)) as client:
        body = big_chat()
        streamed = paced(body, 20, 0.1)
        async with client.stream(
            MODEL, "POST", CHAT, JSON, streamed, first_byte_timeout=1
        ) as response:
            answer = json.loads(b"".join([chunk async for chunk in response.aiter_bytes()]))
        assert response.status == 200
        assert answer["usage"]["prompt_tokens"] >= WORDS  # every word arrived, in order


async def test_a_body_failing_midway_cancels_its_stream_only(
    sshd: SshdSandbox, standin_factory: Callable[..., StandinProcess]
) -> None:
    async with agent_router(sshd, standin_factory(MODEL)), HopClient(target(sshd)) as client:
        broken = paced(big_chat(), 20, 0.01, fail=True)
        with pytest.raises(ConnectionResetError):
            async with client.stream(MODEL, "POST", CHAT, JSON, broken, first_byte_timeout=5):
                pass
        assert all(not link.channel.streams for link in client._links if link is not None)
        async with client.stream(
            MODEL, "POST", CHAT, JSON, chat(1, stream=False), first_byte_timeout=10
        ) as response:
            assert response.status == 200
