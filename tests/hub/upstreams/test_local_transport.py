"""HopClient over the agent's Unix socket (the demo's fallback without sshd): same protocol,
same router, a real stand-in server behind it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
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
