"""Hub overhead: the same requests to the stand-in server directly and through the hub.

    .venv/bin/python bench/hub.py [--sequential 400] [--concurrent 64] [--rounds 3]

Starts a stand-in server and `saia hub serve` (SQLite, one key with a per-minute limit so
the rate-limit counters are on the hot path) as subprocesses on 127.0.0.1, then alternates
direct and hub runs: sequential small non-streamed chat completions (median and p99 latency
added by the hub) and a concurrent phase (requests/s through the hub vs direct). Every loop
is bounded; all processes are stopped by pid at the end. Prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from saia.sandbox.postgres import PostgresSandbox
from saia.sandbox.process import free_port, stop_process

MODEL = "bench-model"
STREAM_MESSAGE = {"role": "user", "content": " ".join(f"w{i}" for i in range(16))}
BODY = {
    "model": MODEL,
    "max_tokens": 4,
    "messages": [{"role": "user", "content": "one two three four five"}],
}


@contextmanager
def process(
    argv: list[str], health: str, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    with tempfile.TemporaryFile() as output:
        proc = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    output.seek(0)
                    raise SystemExit(f"{argv[2:5]} exited: {output.read()[-500:]!r}")
                try:
                    if httpx.get(health, timeout=1, trust_env=False).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            else:
                raise SystemExit(f"{health} did not answer in 30 s")
            yield proc
        finally:
            stop_process(proc, 10)


def hub_key(config: Path, limited: bool) -> str:
    argv = [sys.executable, "-m", "saia", "hub", "keys", "create", "-c", str(config)]
    argv += ["--name", "bench", "--user", "bench"]
    if limited:
        argv += ["--requests-per-minute", "1000000"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    return result.stdout.strip()


async def sequential(client: httpx.AsyncClient, url: str, count: int) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        response = await client.post(url, json=BODY)
        response.raise_for_status()
        times.append(time.perf_counter() - start)
    return times


async def streamed(client: httpx.AsyncClient, url: str, count: int) -> list[tuple[float, float]]:
    """(time to the first chunk, time to the end) of streamed chats of 16 tokens."""
    body = {**BODY, "stream": True, "max_tokens": 16, "messages": [STREAM_MESSAGE]}
    times = []
    for _ in range(count):
        start = time.perf_counter()
        first = 0.0
        async with client.stream("POST", url, json=body) as response:
            response.raise_for_status()
            async for _chunk in response.aiter_raw():
                first = first or time.perf_counter() - start
        times.append((first, time.perf_counter() - start))
    return times


async def concurrent(client: httpx.AsyncClient, url: str, width: int, total: int) -> float:
    """Requests per second with `width` requests in flight, `total` requests in all."""
    queue = iter(range(total))

    async def worker() -> None:
        for _ in queue:
            (await client.post(url, json=BODY)).raise_for_status()

    start = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(width):
            group.create_task(worker())
    return total / (time.perf_counter() - start)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (robust to other load on the machine)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def p99(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, int(len(values) * 0.99))]


async def measure(
    direct: str, hub: str, key: str, args: argparse.Namespace, pids: tuple[int, int]
) -> None:
    standin_pid, hub_pid = pids
    limits = httpx.Limits(max_connections=args.concurrent, max_keepalive_connections=64)
    headers = {"authorization": f"Bearer {key}"}
    timeout = httpx.Timeout(60.0)
    async with httpx.AsyncClient(
        limits=limits, headers=headers, trust_env=False, timeout=timeout
    ) as client:
        await sequential(client, direct, 50)  # warm-up of both paths
        await sequential(client, hub, 50)
        direct_times: list[float] = []
        hub_times: list[float] = []
        hub_cpu = standin_cpu = 0.0
        for _ in range(args.sequential // 20):  # alternate in small slices
            before = cpu_seconds(standin_pid)
            direct_times += await sequential(client, direct, 20)
            standin_cpu += cpu_seconds(standin_pid) - before
            before = cpu_seconds(hub_pid)
            hub_times += await sequential(client, hub, 20)
            hub_cpu += cpu_seconds(hub_pid) - before
        added = statistics.median(hub_times) - statistics.median(direct_times)
        print(f"sequential ({len(hub_times)} requests each, non-streamed chat):")
        print(f"  direct median {statistics.median(direct_times) * 1e3:.2f} ms, "
              f"p99 {p99(direct_times) * 1e3:.2f} ms")  # fmt: skip
        print(f"  hub    median {statistics.median(hub_times) * 1e3:.2f} ms, "
              f"p99 {p99(hub_times) * 1e3:.2f} ms")  # fmt: skip
        print(f"  added  median {added * 1e3:.2f} ms, "
              f"p99 {(p99(hub_times) - p99(direct_times)) * 1e3:.2f} ms")  # fmt: skip
        print(f"  CPU per request: hub process {hub_cpu / len(hub_times) * 1e3:.2f} ms, "
              f"stand-in {standin_cpu / len(direct_times) * 1e3:.2f} ms")  # fmt: skip
        direct_streams: list[tuple[float, float]] = []
        hub_streams: list[tuple[float, float]] = []
        for _ in range(args.streams // 10):
            direct_streams += await streamed(client, direct, 10)
            hub_streams += await streamed(client, hub, 10)
        for name, index in (("first chunk", 0), ("whole stream", 1)):
            d = statistics.median(t[index] for t in direct_streams)
            h = statistics.median(t[index] for t in hub_streams)
            print(
                f"streamed 16-token chat ({len(hub_streams)} each), {name}: direct "
                f"{d * 1e3:.2f} ms, hub {h * 1e3:.2f} ms, added {(h - d) * 1e3:.2f} ms"
            )
        direct_rates, hub_rates = [], []
        for _ in range(args.rounds):
            direct_rates.append(await concurrent(client, direct, args.concurrent, args.total))
            hub_rates.append(await concurrent(client, hub, args.concurrent, args.total))
        direct_rate, hub_rate = statistics.median(direct_rates), statistics.median(hub_rates)
        print(f"concurrent ({args.concurrent} in flight, {args.total} requests, "
              f"median of {args.rounds} alternating rounds):")  # fmt: skip
        print(f"  direct {direct_rate:.0f} req/s, hub {hub_rate:.0f} req/s, "
              f"ratio {hub_rate / direct_rate:.2f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequential", type=int, default=400)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--concurrent", type=int, default=64)
    parser.add_argument("--total", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--postgres", action="store_true", help="a sandbox PostgreSQL instead of SQLite"
    )
    parser.add_argument(
        "--no-limits", action="store_true", help="a key without limits (no counters)"
    )
    args = parser.parse_args()
    if args.postgres:
        with PostgresSandbox() as postgres:
            run(args, postgres.create_database("bench"))
    else:
        run(args, None)


def run(args: argparse.Namespace, database_url: str | None) -> None:
    standin_port, hub_port = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="saia-bench-hub-") as root:
        config = Path(root) / "hub.yaml"
        config.write_text(
            f"port: {hub_port}\ndata_dir: {root}/data\n"
            + (f"database_url: {database_url}\n" if database_url else "")
            + f"upstreams:\n  local:\n    kind: openai\n"
            f"    base_url: http://127.0.0.1:{standin_port}/v1\n"
            f"models:\n  - id: {MODEL}\n    upstream: local\n"
        )
        key = hub_key(config, not args.no_limits)
        standin = [sys.executable, "-m", "hpc.standin", "--port", str(standin_port)]
        standin += ["--model-name", MODEL]
        hub = [sys.executable, "-m", "saia", "hub", "serve", "-c", str(config)]
        env = {**os.environ, "SAIA_HUB_ADMIN_TOKEN": ""}
        with (
            process(standin, f"http://127.0.0.1:{standin_port}/health") as standin_process,
            process(hub, f"http://127.0.0.1:{hub_port}/health", env) as hub_process,
        ):
            database = "PostgreSQL" if database_url else "SQLite"
            limits = "no limits" if args.no_limits else "rate-limited key"
            print(f"python {' '.join(sys.argv)}  (cpus: {os.cpu_count()}, {database}, {limits})")
            asyncio.run(
                measure(
                    f"http://127.0.0.1:{standin_port}/v1/chat/completions",
                    f"http://127.0.0.1:{hub_port}/v1/chat/completions",
                    key,
                    args,
                    (standin_process.pid, hub_process.pid),
                )
            )


if __name__ == "__main__":
    main()
