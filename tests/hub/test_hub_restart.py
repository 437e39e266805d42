"""Fault "f": the hub stopped by SIGTERM in the middle of a stream (`saia hub serve` as a
real process, SQLite, the stand-in model server upstream).

The usage of the requests that finished is written by the flush at exit (the flush interval
is longer than the test), each row exactly once; the stream still running is cut after the
server's shutdown grace and recorded once (499), so the process exits in bounded time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from hub.config import LimitsConfig
from hub.key_store import KeyStore
from hub.server import SHUTDOWN_GRACE
from hub.storage import open_engine, rate_counters, upgrade, usage
from saia.sandbox.process import free_port, stop_process
from tests.hpc.helpers import until, wait_healthy


def write_config(directory: Path, upstream: str) -> Path:
    config = {
        "data_dir": str(directory / "hub-data"),
        "database_url": f"sqlite+aiosqlite:///{directory / 'hub.db'}",
        "usage_flush_interval": 60,  # only the flush at exit writes within this test
        "upstreams": {"local": {"kind": "openai", "base_url": f"{upstream}/v1"}},
        "models": [{"id": "slow", "upstream": "local"}],
    }
    path = directory / "hub.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


async def create_key(url: str) -> str:
    engine = open_engine(url)
    try:
        await upgrade(engine)
        limits = LimitsConfig(tokens_per_day=10**9)  # tokens counted per key
        _record, new = await KeyStore(engine).create(name="k", now=time.time(), limits=limits)
        return new.secret
    finally:
        await engine.dispose()


async def stored(url: str) -> tuple[list[Any], int]:
    """The usage rows, and the key's tokens in the day counters."""
    engine = open_engine(url)
    try:
        async with engine.connect() as connection:
            rows = (await connection.execute(select(usage))).all()
            day = select(func.coalesce(func.sum(rate_counters.c.tokens), 0)).where(
                rate_counters.c.period == "day", rate_counters.c.subject.like("key:%")
            )
            return list(rows), int((await connection.execute(day)).scalar_one())
    finally:
        await engine.dispose()


def start_hub(config: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    """`saia hub serve` as its own process (stopped by pid)."""
    argv = [sys.executable, "-c", "from saia.cli import main; main()", "hub", "serve"]
    argv += ["-c", str(config), "--port", str(port)]
    with open(log, "wb") as output:
        return subprocess.Popen(
            argv, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )


@pytest.mark.faults
async def test_sigterm_mid_stream_writes_the_usage_once_and_exits(
    tmp_path: Path, standin_factory: Any
) -> None:
    slow = standin_factory("slow", token_delay=0.1)
    config = write_config(tmp_path, slow.url)
    url = f"sqlite+aiosqlite:///{tmp_path / 'hub.db'}"
    secret = await create_key(url)
    port = free_port()
    hub = start_hub(config, port, tmp_path / "hub.log")
    headers = {"authorization": f"Bearer {secret}"}
    words = " ".join(f"w{index}" for index in range(600))  # a minute of streaming
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", headers=headers, trust_env=False, timeout=60
        ) as http:
            await wait_healthy(http)
            finished = []
            for _ in range(3):
                body = {"model": "slow", "prompt": "a b", "max_tokens": 2}
                answer = await http.post("/v1/completions", json=body)
                assert answer.status_code == 200, answer.text
                finished.append(answer.headers["x-request-id"])
            body = {"model": "slow", "prompt": words, "max_tokens": 600, "stream": True}
            async with http.stream("POST", "/v1/completions", json=body) as stream:
                streamed = stream.headers["x-request-id"]
                chunks = stream.aiter_bytes()
                await anext(chunks)  # the stream is under way
                hub.send_signal(signal.SIGTERM)
                async with asyncio.timeout(SHUTDOWN_GRACE + 15):  # cut after the grace
                    with contextlib.suppress(httpx.HTTPError):
                        async for _ in chunks:
                            pass
        await until(lambda: hub.poll() is not None, 20, "the hub did not exit after SIGTERM")
        # uvicorn ends by re-raising the signal it caught: -SIGTERM is a clean exit.
        assert hub.returncode in (0, -signal.SIGTERM), (tmp_path / "hub.log").read_text()
    finally:
        stop_process(hub, 10)
    rows, day_tokens = await stored(url)
    assert sorted(row.request_id for row in rows) == sorted([*finished, streamed])
    assert {row.request_id: row.status for row in rows}[streamed] == 499
    assert day_tokens == sum(row.prompt_tokens + row.completion_tokens for row in rows) > 0
