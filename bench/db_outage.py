"""Fault "g" measured: the hub's database unavailable for a while under light load. Prints
figures only.

    .venv/bin/python bench/db_outage.py [--database sqlite|postgres] [--seconds 30]

The hub runs in this process on 127.0.0.1 with the stand-in model server as upstream; two
keys send 10 requests per second each: one with a windowed limit (needs the shared
counters), one without (served from the key cache). SQLite: a second connection holds
`BEGIN EXCLUSIVE`; PostgreSQL: a sandbox server stopped by pid and started again.
Reports the answers during the outage, how soon /health is 200 again, and usage rows
against requests answered.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiosqlite
import httpx
from sqlalchemy import func, select

# bench/hub.py would shadow the `hub` package when this runs as a script: repo root first.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hub.config import LimitsConfig
from hub.storage import usage
from saia.sandbox.postgres import PostgresSandbox
from tests.fixtures.standin import STANDIN_MODEL, start_standin
from tests.hub.helpers import RunningHub, hub_config, running_hub

BODY = {"model": STANDIN_MODEL, "prompt": "a b c", "max_tokens": 2}
Result = tuple[float, int, float]  # end, status, seconds


async def ask(hub: RunningHub, key: str, into: list[Result]) -> None:
    headers = {"authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(
        base_url=hub.url, headers=headers, timeout=60, trust_env=False
    ) as http:
        began = time.perf_counter()
        answer = await http.post("/v1/completions", json=BODY)
        into.append((time.time(), answer.status_code, time.perf_counter() - began))


async def load(hub: RunningHub, keys: dict[str, str], seconds: float) -> dict[str, list[Result]]:
    results: dict[str, list[Result]] = {name: [] for name in keys}
    ends = time.time() + seconds
    async with asyncio.TaskGroup() as group:
        while time.time() < ends:  # bounded: 10 rounds per second for `seconds`
            for name, key in keys.items():
                group.create_task(ask(hub, key, results[name]))
            await asyncio.sleep(0.1)
    return results


async def until_healthy(hub: RunningHub) -> float:
    began = time.time()
    async with httpx.AsyncClient(base_url=hub.url, trust_env=False) as http:
        for _ in range(1200):  # at most a minute
            if (await http.get("/health")).status_code == 200:
                break
            await asyncio.sleep(0.05)
    return time.time() - began


def report(results: dict[str, list[Result]], healthy: float, rows: int, dropped: int) -> None:
    for name, answers in results.items():
        codes: dict[int, int] = {}
        for _, code, _ in answers:
            codes[code] = codes.get(code, 0) + 1
        times = sorted(seconds for _, _, seconds in answers)
        median, worst = times[len(times) // 2] * 1000, times[-1] * 1000
        print(f"{name}: {codes}, latency median {median:.0f} ms, max {worst:.0f} ms")
    print(f"/health 200 again {healthy:.2f} s after the database was back")
    answered = sum(len(answers) for answers in results.values()) + 3
    print(f"requests answered {answered}, usage rows {rows}, dropped {dropped}")


async def run(database: str, seconds: float, work: Path) -> None:
    standin = start_standin()
    postgres = PostgresSandbox() if database == "postgres" else None
    try:
        url = None
        if postgres is not None:
            postgres.start()
            url = postgres.create_database("hub")
        config = hub_config(work, standin.url, STANDIN_MODEL, url, auth={"key_cache_ttl": 600})
        async with running_hub(config) as hub:
            await measure(hub, postgres, seconds)
    finally:
        standin.stop()
        if postgres is not None:
            postgres.stop()


async def measure(hub: RunningHub, postgres: PostgresSandbox | None, seconds: float) -> None:
    keys = {
        "limited key": await hub.create_key(limits=LimitsConfig(requests_per_day=10**6)),
        "unlimited key": await hub.create_key(),
    }
    warm: list[Result] = []
    for key in keys.values():  # both in the key cache
        await ask(hub, key, warm)
    lock: Any = None
    if postgres is None:
        path = hub.services.config.database.removeprefix("sqlite+aiosqlite:///")
        lock = await aiosqlite.connect(path, isolation_level=None)
        await lock.execute("BEGIN EXCLUSIVE")
    else:
        await asyncio.to_thread(postgres.stop_server)
    try:
        results = await load(hub, keys, seconds)
    finally:
        if lock is not None:
            await lock.execute("ROLLBACK")
            await lock.close()
        if postgres is not None:
            await asyncio.to_thread(postgres.start_server)
    healthy = await until_healthy(hub)
    await ask(hub, keys["limited key"], warm)
    await hub.services.recorder.flush()
    async with hub.services.engine.connect() as connection:
        rows = (await connection.execute(select(func.count()).select_from(usage))).scalar_one()
    report(results, healthy, rows, hub.services.recorder.status().dropped)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--seconds", type=float, default=30.0)
    options = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="saia-db-outage-"))
    try:
        asyncio.run(run(options.database, options.seconds, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
