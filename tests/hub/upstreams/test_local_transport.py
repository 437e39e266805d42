"""HopClient over the agent's Unix socket (the demo's fallback without sshd): same protocol,
same router, a real stand-in server behind it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from hpc.registry import Backend
from hub.upstreams.hop_client import HopClient, HopTarget
from tests.fixtures.standin import StandinProcess
from tests.hpc.router.test_router import MODEL, router


async def test_stream_over_the_agent_socket(
    tmp_path: Path, standin_factory: Callable[..., StandinProcess]
) -> None:
    server = standin_factory(MODEL, token_delay=0.01)
    async with router(tmp_path) as registry:
        registry.publish(MODEL, [Backend(service=MODEL, job_id="1", url=server.url)])
        target = HopTarget(
            host="localhost", port=0, user="", client_key=Path(), known_hosts=Path(),
            socket=tmp_path / "state" / "agent.sock",
        )  # fmt: skip
        body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "a b c"}]}
        async with HopClient(target) as client:
            chunks: list[bytes] = []
            async with client.stream(
                MODEL, "POST", "/v1/chat/completions",
                [("content-type", "application/json")], json.dumps(body).encode(),
                first_byte_timeout=10,
            ) as response:  # fmt: skip
                assert response.status == 200
                async for chunk in response.aiter_bytes():
                    chunks.append(chunk)
            services = await client.services()
        text = b"".join(chunks).decode()
        assert len(chunks) > 1 and text.rstrip().endswith("data: [DONE]")
        assert "a b c" in "".join(
            json.loads(line[6:])["choices"][0]["delta"].get("content", "")
            for line in text.splitlines()
            if line.startswith("data: {") and json.loads(line[6:])["choices"]
        )
        assert [s["id"] for s in services] == [MODEL] and services[0]["status"] == "ready"
        await asyncio.sleep(0)
        assert registry.ready(MODEL)[0].in_flight == 0


async def test_an_upload_answered_at_its_head_stops_sending(tmp_path: Path) -> None:
    """The agent refuses an upload at its head (here: no such service) and answers at once:
    the hub stops pulling the client's body instead of pushing the rest for nothing."""
    pulled = 0

    async def upload() -> AsyncIterator[bytes]:
        nonlocal pulled
        for _ in range(40):  # 10 MiB
            pulled += 1
            yield b"x" * 256 * 1024

    async with router(tmp_path):
        target = HopTarget(
            host="localhost", port=0, user="", client_key=Path(), known_hosts=Path(),
            socket=tmp_path / "state" / "agent.sock",
        )  # fmt: skip
        headers = [("content-type", "multipart/form-data; boundary=b")]
        async with HopClient(target) as client, client.stream(
            "no-such-service", "POST", "/v1/audio/transcriptions", headers, upload(),
            first_byte_timeout=10,
        ) as response:  # fmt: skip
            body = b"".join([chunk async for chunk in response.aiter_bytes()])
    assert response.status == 404, body
    assert pulled <= 8, f"{pulled} pieces of 40 pulled after the refusal"  # about one window
