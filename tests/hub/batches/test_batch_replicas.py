"""Two hub replicas on one database (SQLite file, PostgreSQL) and one file store, with the
real agent (router, batch manager, local batch jobs running the stand-in): a batch's output
is copied by exactly one replica; a replica killed while sending the input or copying the
output leaves a lease that expires, and the other replica finishes the batch, once."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import func, select

from hub.batches.tables import batches, files
from hub.config import LimitsConfig
from hub.key_store import KeyStore
from hub.storage import open_engine, upgrade, usage
from saia.sandbox.process import free_port, stop_process
from tests.hpc.helpers import until, wait_healthy
from tests.hub.batches.replicas import (
    replica_config,
    replica_settings,
    requests_file,
    running_agent,
    start_replica,
)
from tests.hub.helpers import RunningHub, running_hub

COUNT = 12
DONE = ("completed", "failed", "cancelled", "expired")
LIMIT = 120.0  # a local batch job starting the stand-in on a loaded machine


def client(url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


async def upload(api: openai.AsyncOpenAI, pad: int = 0) -> str:
    created = await api.files.create(
        file=("in.jsonl", io.BytesIO(requests_file(COUNT, pad))), purpose="batch"
    )
    return created.id


async def finished(api: openai.AsyncOpenAI, batch_id: str) -> Any:
    async with asyncio.timeout(LIMIT):
        while (batch := await api.batches.retrieve(batch_id)).status not in DONE:  # noqa: ASYNC110
            await asyncio.sleep(0.3)
    return batch


async def check_output(hub: RunningHub, api: openai.AsyncOpenAI, batch: Any) -> None:
    """Completed with every custom_id answered once, one usage row per request."""
    assert batch.status == "completed", batch
    assert batch.request_counts.completed == COUNT and batch.request_counts.failed == 0
    text = (await api.files.content(batch.output_file_id)).text
    ids = [json.loads(line)["custom_id"] for line in text.splitlines()]
    assert sorted(ids) == sorted(f"row-{i}" for i in range(COUNT))
    engine = hub.services.engine

    async def rows() -> int:
        async with engine.connect() as connection:
            query = select(func.count()).select_from(usage).where(usage.c.endpoint.like("batch:%"))
            return int((await connection.execute(query)).scalar_one())

    async with asyncio.timeout(30):  # the usage writer flushes every 0.2 s
        while (counted := await rows()) < COUNT:  # noqa: ASYNC110
            await asyncio.sleep(0.2)
    assert counted == COUNT
    async with engine.connect() as connection:
        outputs = select(func.count()).select_from(files).where(files.c.purpose == "batch_output")
        assert (await connection.execute(outputs)).scalar_one() == 1  # no error file, no copy
        lease = select(batches.c.lease_owner).where(batches.c.id == batch.id)
        assert (await connection.execute(lease)).scalar_one() is None  # released


async def create_key(url: str) -> str:
    """A key for user ann, made before any replica in this process runs."""
    engine = open_engine(url)
    try:
        await upgrade(engine)
        limits = LimitsConfig(tokens_per_day=10**9)
        _record, new = await KeyStore(engine).create(
            name="k", now=time.time(), owner="ann", limits=limits
        )
        return new.secret
    finally:
        await engine.dispose()


def jobs_started(caplog: pytest.LogCaptureFixture, batch_id: str) -> int:
    return sum(f"batch {batch_id}: job " in record.getMessage() for record in caplog.records)


def skipped(caplog: pytest.LogCaptureFixture, batch_id: str) -> int:
    """Polls that passed the batch by because a replica holds its lease."""
    return sum(f"batch {batch_id}: held by" in r.getMessage() for r in caplog.records)


async def test_two_replicas_copy_a_batch_output_once(
    tmp_path: Path,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="hub.batches.service")
    agent_dir = tmp_path / "agent"
    agent_dir.mkdir(mode=0o700)
    async with running_agent(agent_dir, monkeypatch) as watch:
        first = replica_config(tmp_path, "a", database_url, agent_dir)
        second = replica_config(tmp_path, "b", database_url, agent_dir)
        async with running_hub(first, check_tasks=False) as a, \
                running_hub(second, check_tasks=False) as b:  # fmt: skip
            key = await a.create_key(owner="ann")
            api = client(a.url, key)
            gate = watch.hold("output")  # the first copy waits half-way...
            lifetime = {"anchor": "created_at", "seconds": 7200}
            batch = await api.batches.create(
                input_file_id=await upload(api), endpoint="/v1/chat/completions",
                completion_window="24h", output_expires_after=lifetime,  # type: ignore[arg-type]
            )  # fmt: skip
            await until(gate.reached.is_set, LIMIT, "a replica copying the output")
            # ...while the other replica polls a few more times (every 0.3 s).
            copies = lambda: skipped(caplog, batch.id) >= 4 or watch.calls["output"] > 1  # noqa: E731
            await until(copies, 30, "polls of the other")
            gate.release.set()
            done = await finished(client(b.url, key), batch.id)
            assert watch.calls["output"] == 1
            await check_output(b, api, done)
            output = await api.files.retrieve(done.output_file_id)
            assert output.expires_at == output.created_at + 7200


@asynccontextmanager
async def killable(
    tmp_path: Path, database_url: str, agent_dir: Path, **batches: Any
) -> AsyncIterator[tuple[str, subprocess.Popen[bytes]]]:
    """Replica "a" as its own process (its URL and process), killed or stopped by pid."""
    settings = replica_settings(tmp_path, "a", database_url, agent_dir, **batches)
    port = free_port()
    process = start_replica(settings, port, tmp_path / "a")
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url, trust_env=False) as http:
            await wait_healthy(http, 60)
        yield url, process
    finally:
        stop_process(process, 10)


def kill(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(10)


@pytest.mark.faults
@pytest.mark.parametrize("held", ["input", "submit"])
async def test_a_batch_left_validating_by_a_killed_replica_is_sent_by_the_other(
    tmp_path: Path,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    held: str,
) -> None:
    """Replica a answered `validating` and is killed while it sends the input (a piece past
    the first) or once the agent submitted the job (before a hears it): b sends it again
    once a's lease expired, and the agent runs it once."""
    caplog.set_level(logging.INFO, logger="hpc.batch.manager")
    agent_dir = tmp_path / "agent"
    agent_dir.mkdir(mode=0o700)
    async with running_agent(agent_dir, monkeypatch) as watch:
        config = replica_config(tmp_path, "b", database_url, agent_dir)
        async with running_hub(config, check_tasks=False) as b, \
                killable(tmp_path, database_url, agent_dir, transfer_chunk_bytes=4096) as (
                    url, a):  # fmt: skip
            key = await b.create_key(owner="ann")
            api = client(url, key)
            file_id = await upload(api, pad=400)  # ~10 KB: three pieces of 4 KiB
            gate = watch.hold(held)
            batch = await api.batches.create(
                input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            assert batch.status == "validating"
            await until(gate.reached.is_set, 60, f"replica a's {held}")
            kill(a)
            gate.release.set()
            done = await finished(client(b.url, key), batch.id)
            await check_output(b, client(b.url, key), done)
    assert watch.calls["submit"] == 1  # a's (held) or b's: never both
    assert jobs_started(caplog, batch.id) == 1


@pytest.mark.faults
async def test_a_replica_killed_mid_copy_leaves_the_output_to_the_other(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replica a is killed half-way through copying a batch's output; b, started after,
    waits for a's lease to expire, copies it all again, and nothing of a's half copy shows."""
    agent_dir = tmp_path / "agent"
    agent_dir.mkdir(mode=0o700)
    async with running_agent(agent_dir, monkeypatch) as watch:
        async with killable(tmp_path, database_url, agent_dir) as (url, a):
            key = await create_key(database_url)
            api = client(url, key)
            gate = watch.hold("output")
            batch = await api.batches.create(
                input_file_id=await upload(api), endpoint="/v1/chat/completions",
                completion_window="24h",
            )  # fmt: skip
            await until(gate.reached.is_set, LIMIT, "replica a copying the output")
            kill(a)
            gate.release.set()
        assert watch.calls["output"] == 1
        config = replica_config(tmp_path, "b", database_url, agent_dir)
        async with running_hub(config, check_tasks=False) as b:
            done = await finished(client(b.url, key), batch.id)
            assert watch.calls["output"] == 2
            await check_output(b, client(b.url, key), done)
    visible = [name for name in os.listdir(tmp_path / "files") if not name.startswith(".")]
    assert sorted(visible) == sorted([done.input_file_id, done.output_file_id])
