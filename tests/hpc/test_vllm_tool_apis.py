"""The real vLLM 0.32 (SmolLM2 in a Slurm job, `smollm2_job`) answers the Responses API and
Anthropic's Messages API through the agent's router, streamed and not, and the hub's usage
reader (hub/proxy/sse.py, what fills the usage rows) gets exactly the tokens vLLM reports.

vLLM 0.32 serves both in `vllm serve` itself (vllm/entrypoints/openai/responses and
vllm/entrypoints/anthropic). Greedy decoding keeps the answers the same from run to run.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from cloud_interface.relay import SOCKET_NAME
from hpc.config import AgentConfig, ServiceConfig
from hpc.registry import Backend, BackendRegistry
from hpc.router.server import serve_requests
from hub.proxy.sse import Usage, UsageTap, usage_from_body
from saia.base import protocol as wire
from saia.base.mux import Channel
from tests.fixtures.vllm import VllmJob
from tests.saia.mux_helpers import next_frame

pytestmark = pytest.mark.vllm
QUESTION = "What is the capital of France? Answer in one word."


class RouterClient:
    """The relay's side of the agent's socket: one request at a time, the answer whole."""

    def __init__(self, channel: Channel, service: str) -> None:
        self.channel, self.service, self.next_id = channel, service, 0

    async def request(self, method: str, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
        self.next_id += 1
        state = self.channel.open(self.next_id)
        head = wire.RequestHead(self.service, method, path, [("content-type", "application/json")])
        self.channel.send(wire.encode_request(state.id, head))
        await self.channel.send_data(state, json.dumps(body).encode())
        self.channel.send(wire.encode_frame(wire.END, state.id))
        status, chunks = 0, []
        async with asyncio.timeout(120):
            while (frame := await next_frame(self.channel)) is not None:
                if frame.type == wire.RESPONSE:
                    status = wire.parse_response(frame.payload).status
                elif frame.type == wire.DATA:
                    self.channel.consumed(state, len(frame.payload))
                    chunks.append(frame.payload)
                else:
                    assert frame.type == wire.END, wire.describe(frame)
                    break
        self.channel.discard(state)
        return status, b"".join(chunks)


@asynccontextmanager
async def routed(job: VllmJob, state_dir: Path) -> AsyncIterator[RouterClient]:
    """The agent's router on its socket, with the vLLM job as the service's one backend:
    over TLS, pinned to the job's own certificate (backend_tls, the default)."""
    assert job.certificate and job.url.startswith("https://")
    config = AgentConfig(
        state_dir=state_dir, services=[ServiceConfig(name=job.model, model=job.model)]
    )
    registry = BackendRegistry()
    registry.publish(
        job.model,
        [Backend(job.model, job.job_id, job.url, api_key=job.key, certificate=job.certificate)],
    )
    task = asyncio.create_task(serve_requests(config, registry))
    try:
        async with asyncio.timeout(10):
            while not (state_dir / SOCKET_NAME).exists():  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        reader, writer = await asyncio.open_unix_connection(str(state_dir / SOCKET_NAME))
        channel = Channel(reader, writer)
        channel.send(wire.encode_hello())
        async with asyncio.timeout(10):
            assert await channel.read_hello() == wire.VERSION
        yield RouterClient(channel, job.model)
        writer.close()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def events(body: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of each SSE event."""
    out = []
    for block in body.decode().split("\n\n"):
        name = next((ln[7:] for ln in block.splitlines() if ln.startswith("event: ")), "")
        data = [ln[6:] for ln in block.splitlines() if ln.startswith("data: ")]
        if data and data[0] != "[DONE]":
            out.append((name, json.loads(data[0])))
    return out


def tapped(body: bytes) -> Usage | None:
    """The usage the hub counts from this event stream."""
    tap = UsageTap("all")
    tap.feed(body)
    tap.flush()
    return tap.usage


async def test_responses_api_through_the_router(smollm2_job: VllmJob, tmp_path: Path) -> None:
    request = {"model": smollm2_job.model, "input": QUESTION, "temperature": 0}
    async with routed(smollm2_job, tmp_path) as client:
        status, body = await client.request("POST", "/v1/responses", request)
        assert status == 200, body[:300]
        whole = json.loads(body)
        assert whole["object"] == "response" and whole["status"] == "completed"
        text = whole["output"][-1]["content"][0]["text"]
        assert "Paris" in text, text
        usage = whole["usage"]
        assert usage_from_body(body) == Usage(usage["input_tokens"], usage["output_tokens"])
        assert usage["output_tokens"] > 0 and usage["input_tokens"] > 5
        status, streamed = await client.request(
            "POST", "/v1/responses", {**request, "stream": True}
        )
    assert status == 200, streamed[:300]
    got = events(streamed)
    deltas = [d["delta"] for name, d in got if name == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == text  # token by token, the same answer
    final = next(d["response"] for name, d in got if name == "response.completed")
    assert final["usage"]["output_tokens"] == usage["output_tokens"]
    assert tapped(streamed) == Usage(usage["input_tokens"], usage["output_tokens"])


async def test_messages_api_through_the_router(smollm2_job: VllmJob, tmp_path: Path) -> None:
    messages = [{"role": "user", "content": QUESTION}]
    request = {"model": smollm2_job.model, "max_tokens": 20, "messages": messages}
    request["temperature"] = 0
    async with routed(smollm2_job, tmp_path) as client:
        status, body = await client.request("POST", "/v1/messages", request)
        assert status == 200, body[:300]
        whole = json.loads(body)
        assert whole["type"] == "message" and whole["role"] == "assistant"
        text = whole["content"][0]["text"]
        assert "Paris" in text, text
        usage = whole["usage"]
        assert usage_from_body(body) == Usage(usage["input_tokens"], usage["output_tokens"])
        status, streamed = await client.request("POST", "/v1/messages", {**request, "stream": True})
    assert status == 200, streamed[:300]
    got = events(streamed)
    assert got[0][0] == "message_start" and got[-1][0] == "message_stop"
    deltas = [d["delta"].get("text", "") for name, d in got if name == "content_block_delta"]
    assert len(deltas) > 1 and "".join(deltas) == text
    last = [d["usage"] for name, d in got if name == "message_delta"][-1]
    assert last["output_tokens"] == usage["output_tokens"]
    assert tapped(streamed) == Usage(usage["input_tokens"], usage["output_tokens"])
