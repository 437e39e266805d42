"""Batches through the real chain with the unchanged `openai` SDK: hub -> sshd forced
command -> relay -> agent -> a batch job on the sandbox Slurm cluster whose driver
(slurm/saia_batch_driver.py) runs the stand-in server. 200 requests complete with every
custom_id answered; a cancel half-way leaves `cancelled` with the partial output; a job
killed outside saia is resumed by another; the usage is recorded per request as batch usage."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from sqlalchemy import func, select

from hub.storage import open_engine, rate_counters, usage
from saia.sandbox.process import stop_process
from saia.sandbox.slurm import SlurmSandbox
from tests.faults.chain import FaultChain, running

# A service of its own; its batch jobs run the stand-in server (token pacing as set), which
# generates one answer at a time however many the batch driver sends at once (so a batch
# runs long enough to be cancelled or killed half-way).
SERVICES = [{"name": "bulk", "server_args": ["--token-delay", "0.01", "--max-running", "1"]}]
POLL_LIMIT = 150.0  # a batch job starting on the sandbox cluster and running 200 requests


class BatchChain(FaultChain):
    """The fault chain whose hub polls its batches every second; its stop also reports
    batch jobs left behind."""

    restarted = False  # the agent was replaced by one the relay started (no drain on exit)

    def _hub_config(self) -> dict[str, Any]:
        return super()._hub_config() | {"batches": {"poll_interval": 1}}

    def stop(self) -> list[str]:
        left = super().stop()
        if self.restarted:  # the relay's agent leaves its service job by design (removed)
            left = [item for item in left if not item.startswith("Slurm jobs")]
        names = self.cluster.run(["squeue", "--noheader", "--format=%i %j"]).stdout.split("\n")
        for line in names:
            job_id, _, name = line.strip().partition(" ")
            if name.startswith(f"{self.prefix}-batch-"):
                left.append(f"batch job {job_id} ({name})")
                self.cluster.run(["scancel", job_id])
        return left


@pytest.fixture(scope="module")
def fault_chain(
    slurm_cluster: SlurmSandbox, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FaultChain]:
    chain = BatchChain(tmp_path_factory.mktemp("chain"), slurm_cluster, SERVICES)
    with running(chain):
        yield chain


def requests_file(count: int, words: int = 3, max_tokens: int = 8) -> bytes:
    lines = []
    for i in range(count):
        text = " ".join(f"w{i}-{j}" for j in range(words))
        body = {"model": "bulk", "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": text}]}  # fmt: skip
        lines.append({"custom_id": f"row-{i}", "method": "POST",
                      "url": "/v1/chat/completions", "body": body})  # fmt: skip
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def api(chain: FaultChain, key: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{chain.hub_url}/v1", api_key=chain.keys[key], max_retries=0)


def wait_for(client: openai.OpenAI, batch_id: str, done: Any, limit: float = POLL_LIMIT) -> Any:
    deadline = time.monotonic() + limit
    seen = []
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        seen.append((batch.status, batch.request_counts.completed if batch.request_counts else 0))
        if done(batch):
            return batch
        time.sleep(0.5)
    raise AssertionError(f"batch {batch_id} not there within {limit:.0f} s: {seen[-5:]}")


def test_200_requests_complete_with_every_answer(fault_chain: FaultChain) -> None:
    client = api(fault_chain)
    broken = requests_file(2) + b'{"custom_id": "row-2", "method": "POST"\n'
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("broken.jsonl", io.BytesIO(broken)), purpose="batch")
    assert "line 3 is not JSON" in str(caught.value.body) and client.files.list().data == []
    chat = client.chat.completions.create(
        model="bulk", max_tokens=4, messages=[{"role": "user", "content": "one interactive"}]
    )
    assert chat.usage is not None
    interactive = until_counted(fault_chain, chat.usage.total_tokens)
    content = requests_file(200)
    uploaded = client.files.create(file=("bulk.jsonl", io.BytesIO(content)), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"run": "e2e"})  # fmt: skip
    counts = batch.request_counts
    assert batch.status == "validating" and counts is not None and counts.total == 200, batch
    progress: list[int] = []

    def finished(batch: Any) -> bool:
        progress.append(batch.request_counts.completed)
        return batch.status in ("completed", "failed", "cancelled", "expired")

    batch = wait_for(client, batch.id, finished)
    assert batch.status == "completed", batch
    assert (batch.request_counts.completed, batch.request_counts.failed) == (200, 0)
    assert batch.error_file_id is None and batch.output_file_id and batch.metadata == {"run": "e2e"}
    lines = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(line["custom_id"] for line in lines) == sorted(f"row-{i}" for i in range(200))
    for line in lines:
        index = line["custom_id"].split("-")[1]
        answer = line["response"]["body"]["choices"][0]["message"]["content"]
        assert answer == f"echo: w{index}-0 w{index}-1 w{index}-2"  # the stand-in's echo
        assert line["response"]["body"]["model"] == "bulk"
    assert client.batches.list(limit=5).data[0].id == batch.id
    assert api(fault_chain, 1).batches.list().data == []  # another owner sees none of it
    rows = batch_usage(fault_chain, batch.id)
    assert len(rows) == 200 and {r.endpoint for r in rows} == {"batch:/v1/chat/completions"}
    assert sum(r.completion_tokens for r in rows) == 200 * 4  # "echo:" and three words
    assert batch.usage is not None and batch.usage.output_tokens == 800
    assert counted_tokens(fault_chain) == interactive  # batch tokens: on no rate limit


def counted_tokens(chain: FaultChain) -> int:
    async def read() -> int:
        engine = open_engine(f"sqlite+aiosqlite:///{chain.root / 'hub-data' / 'hub.db'}")
        try:
            async with engine.connect() as connection:
                total = select(func.coalesce(func.sum(rate_counters.c.tokens), 0))
                return int((await connection.execute(total)).scalar_one())
        finally:
            await engine.dispose()

    return asyncio.run(read())


def until_counted(chain: FaultChain, tokens: int) -> int:
    """The rate-limit tokens once the interactive request's are counted (flushed 0.2 s)."""
    deadline = time.monotonic() + 10
    while (counted := counted_tokens(chain)) < tokens and time.monotonic() < deadline:
        time.sleep(0.2)
    assert counted >= tokens, counted
    return counted


def batch_usage(chain: FaultChain, batch_id: str) -> list[Any]:
    async def read() -> list[Any]:
        engine = open_engine(f"sqlite+aiosqlite:///{chain.root / 'hub-data' / 'hub.db'}")
        try:
            async with engine.connect() as connection:
                statement = select(usage).where(usage.c.request_id.like(f"{batch_id}:%"))
                return list((await connection.execute(statement)).all())
        finally:
            await engine.dispose()

    deadline = time.monotonic() + 10
    while True:  # the usage writer flushes every 0.2 s
        rows = asyncio.run(read())
        if len(rows) >= 200 or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def test_cancel_half_way_keeps_the_partial_output(fault_chain: FaultChain) -> None:
    client = api(fault_chain)
    content = requests_file(200, words=12, max_tokens=12)  # ~0.13 s a request: ~26 s in all
    uploaded = client.files.create(file=("slow.jsonl", io.BytesIO(content)), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")  # fmt: skip
    wait_for(client, batch.id, lambda b: b.request_counts.completed >= 20)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling"
    batch = wait_for(client, batch.id, lambda b: b.status not in ("cancelling", "in_progress"))
    assert batch.status == "cancelled" and batch.cancelled_at, batch
    done = batch.request_counts.completed
    assert 20 <= done < 200, batch.request_counts
    lines = client.files.content(batch.output_file_id).text.splitlines()
    assert len(lines) == done
    assert {json.loads(line)["custom_id"] for line in lines} <= {f"row-{i}" for i in range(200)}
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch.id)


def start_slow_batch(client: openai.OpenAI, at_least: int) -> Any:
    """A batch of 200 slow requests, once `at_least` of them are done."""
    content = requests_file(200, words=12, max_tokens=12)
    uploaded = client.files.create(file=("slow.jsonl", io.BytesIO(content)), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")  # fmt: skip
    return wait_for(client, batch.id, lambda b: b.request_counts.completed >= at_least)


def test_a_job_killed_outside_saia_is_resumed_by_another_to_completion(
    fault_chain: FaultChain,
) -> None:
    """scancel outside saia looks to the job like preemption (SIGTERM): the agent submits
    another job, whose driver skips what the first answered; the batch stays in_progress."""
    client = api(fault_chain)
    batch = start_slow_batch(client, 10)
    name = f"--name={fault_chain.prefix}-{batch.id}"
    first = fault_chain.cluster.run(["squeue", "--noheader", "--format=%i", name]).stdout.split()
    assert fault_chain.cluster.run(["scancel", name]).returncode == 0
    statuses: list[str] = []

    def ended(batch: Any) -> bool:
        statuses.append(batch.status)
        return batch.status not in ("in_progress", "finalizing")

    batch = wait_for(client, batch.id, ended)
    assert batch.status == "completed" and set(statuses) <= {"in_progress", "finalizing",
                                                             "completed"}, statuses  # fmt: skip
    assert batch.request_counts.completed == 200 and batch.request_counts.failed == 0
    shown = json.loads(saia_hub(fault_chain, "batches", "show", batch.id).stdout)
    assert len(first) == 1 and shown["job_id"] != first[0]  # another job finished it
    lines = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(line["custom_id"] for line in lines) == sorted(f"row-{i}" for i in range(200))


def saia_hub(chain: FaultChain, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "saia", "hub", *args, "-c", str(chain.root / "hub.yaml")]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def test_operators_list_show_and_cancel_with_the_cli(fault_chain: FaultChain) -> None:
    client = api(fault_chain)
    batch = start_slow_batch(client, 5)
    cancelled = saia_hub(fault_chain, "batches", "cancel", batch.id)
    assert cancelled.returncode == 0 and cancelled.stdout.strip() == f"cancelling {batch.id}"
    batch = wait_for(client, batch.id, lambda b: b.status not in ("cancelling", "in_progress"))
    assert batch.status == "cancelled" and batch.request_counts.completed >= 5
    listing = saia_hub(fault_chain, "batches", "list", "--status", "cancelled")
    assert listing.returncode == 0 and batch.id in listing.stdout, listing
    shown = json.loads(saia_hub(fault_chain, "batches", "show", batch.id).stdout)
    assert shown["status"] == "cancelled" and shown["job_id"] and shown["price_factor"] == 1.0
    assert shown["completion_tokens"] == 12 * shown["completed"]  # max_tokens of each
    again = saia_hub(fault_chain, "batches", "cancel", batch.id)
    assert again.returncode == 2 and again.stderr.strip() == f"no running batch {batch.id}"


def test_a_restarted_agent_carries_on_with_the_batch(fault_chain: FaultChain) -> None:
    """The agent stops mid-batch; the relay starts a new one at the hub's next poll (as in
    production), which answers for the same job from the batch's files and Slurm."""
    client = api(fault_chain)
    batch = start_slow_batch(client, 10)
    assert isinstance(fault_chain, BatchChain)
    fault_chain.restarted = True
    stop_process(fault_chain.processes.pop("agent"), 75)  # the batch job runs on
    batch = wait_for(client, batch.id, lambda b: b.status not in ("in_progress", "finalizing"))
    assert batch.status == "completed" and batch.request_counts.completed == 200, batch
