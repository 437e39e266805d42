"""A batch larger than its job's time limit on the sandbox Slurm cluster: Slurm ends the
first job at its --time of one minute, the agent's batch manager submits another for the
requests left, and that one's driver carries on where the first stopped, to completion
with every custom_id answered exactly once."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from hpc.batch.manager import BatchManager
from hpc.config import parse_config
from saia.sandbox.slurm import SlurmSandbox
from tests.hpc.batch.test_vllm_batch import ask

pytestmark = [pytest.mark.slurm]
REQUESTS = 240  # ~1 s each, 2 at a time: ~120 s of work, twice what the first job gets
RUN_LIMIT = 420.0  # two jobs through a busy sandbox cluster


def config(cluster: SlurmSandbox, state_dir: Path, prefix: str) -> Any:
    service = {"name": "bulk", "model": "bulk", "template": "standin",
               "server_args": ["--token-delay", "0.1"],
               "resources": {"cpus": 1, "memory": "512M"}}  # fmt: skip
    batch = {"min_time": 60, "max_time": 60, "load_time": 0, "concurrency": 2,
             "stop_grace": 2, "max_attempts": 4}  # fmt: skip
    return parse_config({
        "state_dir": str(state_dir), "slurm_conf": str(cluster.slurm_conf),
        "slurm_bin_dir": str(cluster.bin_dir), "job_prefix": prefix, "python": sys.executable,
        "batch": batch, "services": [service],
    })  # fmt: skip


async def test_a_batch_cut_by_its_time_limit_is_resumed_to_completion(
    tmp_path: Path, slurm_cluster: SlurmSandbox
) -> None:
    prefix = "r" + uuid.uuid4().hex[:8]
    agent = config(slurm_cluster, tmp_path / "state", prefix)
    manager, batch = BatchManager(lambda: agent), f"batch-{uuid.uuid4().hex[:24]}"
    lines = [
        {"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "bulk", "max_tokens": 10,
                  "messages": [{"role": "user", "content": f"a b c d e f g h i {i}"}]}}
        for i in range(REQUESTS)
    ]  # fmt: skip
    data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    assert (await ask(manager, "PUT", f"{batch}/input", data, 0))[0] == 200
    spec = {"service": "bulk", "requests": REQUESTS, "window_s": 3600}
    status, answer = await ask(manager, "POST", batch, json.dumps(spec).encode())
    assert status == 200, answer
    first_job = json.loads(answer)["job_id"]
    folder = tmp_path / "state" / "batches" / batch
    try:
        seen = await until_done(manager, batch)
        assert seen[-1]["state"] == "completed", seen[-5:]
        record = json.loads((folder / "batch.json").read_text())
        assert record["attempts"] >= 2 and record["job_id"] != first_job, record
        # the first job was stopped by Slurm (its driver's status, kept under its job id)
        assert (folder / f"exit_code.{first_job}").read_text().strip() in ("143", "3")
        partial = [s["completed"] for s in seen if s["job_id"] == first_job]
        assert 0 < max(partial) < REQUESTS, partial  # it had answered some, not all
        assert any(s["state"] == "queued" and "resubmitted" in (s["message"] or "") for s in seen)
        status, output = await ask(manager, "GET", f"{batch}/output")
        ids = [json.loads(line)["custom_id"] for line in output.splitlines()]
        assert status == 200 and sorted(ids) == sorted(f"q{i}" for i in range(REQUESTS))
        assert seen[-1]["completed"] == REQUESTS and seen[-1]["failed"] == 0
    finally:
        slurm_cluster.run(["scancel", f"--name={prefix}-{batch}"])


async def until_done(manager: BatchManager, batch: str) -> list[dict[str, Any]]:
    deadline, seen = time.monotonic() + RUN_LIMIT, []
    while time.monotonic() < deadline:
        status, answer = await ask(manager, "GET", batch)
        seen.append(json.loads(answer))
        assert status == 200, seen[-1]
        if seen[-1]["state"] not in ("queued", "running"):
            return seen
        await asyncio.sleep(2)
    raise AssertionError(f"the batch did not end within {RUN_LIMIT:.0f} s: {seen[-3:]}")
