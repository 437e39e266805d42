"""Batches through the real `vllm serve` (CPU build, SmolLM2-135M-Instruct) that the job's
driver starts in a sandbox Slurm job, driven by the agent's batch manager as the hop would
drive it: 20 requests from input in pieces to output streamed and files removed; a batch
cancelled mid-way keeps the answers made so far."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from hpc.batch.manager import BatchManager
from saia.base import protocol as wire
from saia.sandbox.slurm import SlurmSandbox
from saia.sandbox.vllm import VllmInstall
from tests.hpc.test_vllm_slurm import SERVICE, vllm_config

pytestmark = [pytest.mark.vllm, pytest.mark.slurm]
RUN_LIMIT = 400.0  # vLLM loads (~45 s on 2 cores, more when busy) and answers 20 requests


class Collected:
    """A sink that keeps the answer (`hpc.batch.manager.Sink`)."""

    def __init__(self) -> None:
        self.status, self.body, self.finished = 0, bytearray(), False

    def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        self.status = status

    async def send(self, data: bytes) -> None:
        self.body += data

    def finish(self) -> None:
        self.finished = True


async def ask(
    manager: BatchManager, method: str, path: str, body: bytes = b"", offset: int | None = None
) -> tuple[int, Any]:
    headers = [("x-saia-offset", str(offset))] if offset is not None else []
    sink = Collected()
    head = wire.RequestHead("", method, f"/saia/batches/{path}", headers)
    await manager.answer(sink, head, body)
    assert sink.finished
    return sink.status, bytes(sink.body)


async def test_vllm_run_batch_answers_20_requests(
    tmp_path: Path, slurm_cluster: SlurmSandbox, vllm_install: VllmInstall
) -> None:
    prefix = "v" + uuid.uuid4().hex[:8]
    config = vllm_config(
        slurm_cluster, vllm_install, tmp_path / "state", prefix, min_instances=0,
        model=str(vllm_install.chat_model_dir),
        vllm={"max_model_len": 1024, "dtype": "float32", "enforce_eager": True},
    )  # fmt: skip
    manager, batch = BatchManager(lambda: config), f"batch-{uuid.uuid4().hex[:24]}"
    lines = [
        {"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": SERVICE, "max_tokens": 4, "temperature": 0,
                  "messages": [{"role": "user", "content": f"Count to {i}."}]}}
        for i in range(20)
    ]  # fmt: skip
    data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    assert (await ask(manager, "PUT", f"{batch}/input", data[:1000], 0))[0] == 200
    assert (await ask(manager, "PUT", f"{batch}/input", data[1000:], 1000))[0] == 200
    spec = {"service": SERVICE, "requests": 20, "window_s": 3600, "user": "u", "group": None}
    status, answer = await ask(manager, "POST", batch, json.dumps(spec).encode())
    assert status == 200, answer
    try:
        state = await until_done(manager, batch)
        assert state["state"] == "completed" and state["completed"] == 20, state
        status, output = await ask(manager, "GET", f"{batch}/output")
        results = [json.loads(line) for line in output.splitlines()]
        assert status == 200 and sorted(r["custom_id"] for r in results) == sorted(
            f"q{i}" for i in range(20))  # fmt: skip
        for result in results:
            body = result["response"]["body"]
            assert result["response"]["status_code"] == 200 and body["model"] == SERVICE
            assert 0 < body["usage"]["completion_tokens"] <= 4
            assert body["choices"][0]["message"]["content"]
        assert (await ask(manager, "DELETE", batch))[0] == 200
        assert not (tmp_path / "state" / "batches" / batch).exists()
    finally:
        slurm_cluster.run(["scancel", f"--name={prefix}-{batch}"])


async def until_done(manager: BatchManager, batch: str) -> dict[str, Any]:
    deadline, state = time.monotonic() + RUN_LIMIT, dict[str, Any]()
    while time.monotonic() < deadline:
        status, answer = await ask(manager, "GET", batch)
        state = dict(json.loads(answer))
        assert status == 200, state
        if state["state"] not in ("queued", "running"):
            return state
        await asyncio.sleep(2)
    raise AssertionError(f"the batch did not end within {RUN_LIMIT:.0f} s: {state}")


async def test_a_cancelled_vllm_batch_keeps_the_answers_made_so_far(
    tmp_path: Path, slurm_cluster: SlurmSandbox, vllm_install: VllmInstall
) -> None:
    prefix = "v" + uuid.uuid4().hex[:8]
    config = vllm_config(
        slurm_cluster, vllm_install, tmp_path / "state", prefix, min_instances=0,
        model=str(vllm_install.chat_model_dir),
        vllm={"max_model_len": 1024, "dtype": "float32", "enforce_eager": True},
    )  # fmt: skip
    # Two at a time, so the answers arrive one after another and a cancel falls mid-way.
    config = config.model_copy(update={"batch": config.batch.model_copy(update={"concurrency": 2})})
    manager, batch = BatchManager(lambda: config), f"batch-{uuid.uuid4().hex[:24]}"
    lines = [
        {"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": SERVICE, "max_tokens": 16, "temperature": 0,
                  "messages": [{"role": "user", "content": f"Tell a story about {i}."}]}}
        for i in range(60)
    ]  # fmt: skip
    data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    assert (await ask(manager, "PUT", f"{batch}/input", data, 0))[0] == 200
    spec = {"service": SERVICE, "requests": 60, "window_s": 3600}
    assert (await ask(manager, "POST", batch, json.dumps(spec).encode()))[0] == 200
    try:
        deadline, state = time.monotonic() + RUN_LIMIT, dict[str, Any]()
        while time.monotonic() < deadline:
            state = dict(json.loads((await ask(manager, "GET", batch))[1]))
            if state["completed"] >= 4 or state["state"] not in ("queued", "running"):
                break
            await asyncio.sleep(1)
        assert state["state"] == "running" and 4 <= state["completed"] < 60, state
        assert (await ask(manager, "POST", f"{batch}/cancel"))[0] == 200
        state = await until_done(manager, batch)
        assert state["state"] == "cancelled" and 4 <= state["completed"] < 60, state
        status, output = await ask(manager, "GET", f"{batch}/output")
        results = [json.loads(line) for line in output.splitlines()]
        assert status == 200 and len(results) == state["completed"] + state["failed"]
        assert len({r["custom_id"] for r in results}) == len(results)
        for result in results:
            assert result["response"]["status_code"] == 200
            assert result["response"]["body"]["choices"][0]["message"]["content"]
    finally:
        slurm_cluster.run(["scancel", f"--name={prefix}-{batch}"])
