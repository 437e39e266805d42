"""What the SSH hop costs: HopClient -> sshd -> relay -> router -> stand-in, against a direct
httpx call to the same stand-in, alternating in one run. Prints figures; asserts nothing.

    .venv/bin/python bench/hop.py [--sequential 400] [--concurrent 64] [--requests 2000]

Runs everything on 127.0.0.1: a stand-in server, a throw-away sshd with the forced-command
key, and the agent's router in its own process (as on a login node).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from hpc.config import AgentConfig, RouterConfig, ServiceConfig
from hpc.registry import Backend, BackendRegistry
from hpc.router import SOCKET_NAME, serve_requests
from hub.ssh_client import HopClient, HopTarget
from saia.sandbox.sshd import SshdSandbox, free_port

MODEL = "bench-model"
BODY = json.dumps(
    {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
).encode()
HEADERS = [("content-type", "application/json")]

Call = Callable[[], Awaitable[None]]


def start_process(argv: list[str], ready: Callable[[], bool]) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{argv[:3]} exited with {process.returncode}")
        if ready():
            return process
        time.sleep(0.05)
    process.kill()
    raise SystemExit(f"{argv[:3]} did not start")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def run_router(state_dir: str, url: str) -> None:
    """The agent's router alone (child process), with the stand-in published as ready."""
    config = AgentConfig(
        state_dir=Path(state_dir),
        services=[ServiceConfig(name=MODEL, model=MODEL)],
        router=RouterConfig(max_queue=4096),
    )
    registry = BackendRegistry()
    registry.publish(MODEL, [Backend(MODEL, "bench", url)])
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve_requests(config, registry))


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def sequential(direct: Call, hop: Call, count: int) -> None:
    times: dict[str, list[float]] = {"direct": [], "hop": []}
    for _ in range(20):  # warm up both paths
        await direct()
        await hop()
    for _ in range(count):
        for name, call in (("direct", direct), ("hop", hop)):
            start = time.perf_counter()
            await call()
            times[name].append((time.perf_counter() - start) * 1000)
    d, h = times["direct"], times["hop"]
    print(f"sequential, {count} requests each (ms):")
    for name, values in times.items():
        print(
            f"  {name:6s} median {statistics.median(values):6.2f}   "
            f"p99 {percentile(values, 0.99):6.2f}"
        )
    added_median = statistics.median(h) - statistics.median(d)
    added_p99 = percentile(h, 0.99) - percentile(d, 0.99)
    print(f"  added  median {added_median:6.2f}   p99 {added_p99:6.2f}")


async def throughput(call: Call, workers: int, total: int) -> float:
    remaining = total

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    start = time.perf_counter()
    async with asyncio.TaskGroup() as tasks:
        for _ in range(workers):
            tasks.create_task(worker())
    return total / (time.perf_counter() - start)


async def concurrent(direct: Call, hop: Call, workers: int, total: int, rounds: int) -> None:
    rates: dict[str, list[float]] = {"direct": [], "hop": []}
    for _ in range(rounds):
        rates["direct"].append(await throughput(direct, workers, total))
        rates["hop"].append(await throughput(hop, workers, total))
    print(f"{workers} concurrent, {rounds} alternating rounds of {total} requests (req/s):")
    for name, values in rates.items():
        print(f"  {name:6s} " + "  ".join(f"{v:7.0f}" for v in values))
    ratio = statistics.median(rates["hop"]) / statistics.median(rates["direct"])
    print(f"  hop/direct ratio (medians): {ratio:.2f}")


async def measure(url: str, sshd: SshdSandbox, args: argparse.Namespace) -> None:
    target = HopTarget(sshd.host, sshd.port, sshd.user, sshd.client_key, sshd.known_hosts)
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(limits=limits, trust_env=False) as http, HopClient(target) as hop:

        async def direct() -> None:
            response = await http.post(f"{url}/v1/chat/completions", content=BODY, headers=HEADERS)
            assert response.status_code == 200, response.text

        async def via_hop() -> None:
            async with hop.stream(
                MODEL, "POST", "/v1/chat/completions", HEADERS, BODY, first_byte_timeout=30
            ) as response:
                body = b"".join([chunk async for chunk in response.aiter_bytes()])
            assert response.status == 200, body

        await sequential(direct, via_hop, args.sequential)
        await concurrent(direct, via_hop, args.concurrent, args.requests, args.rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequential", type=int, default=400)
    parser.add_argument("--concurrent", type=int, default=64)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--serve-router", nargs=2, metavar=("STATE_DIR", "URL"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.serve_router:
        run_router(*args.serve_router)
        return
    with tempfile.TemporaryDirectory(prefix="saia-bench-hop-") as tmp:
        root = Path(tmp)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        argv = [sys.executable, "-m", "hpc.standin", "--host", "127.0.0.1", "--port", str(port)]
        standin = start_process([*argv, "--model-name", MODEL], lambda: healthy(url))
        router = start_process(
            [sys.executable, __file__, "--serve-router", str(root / "state"), url],
            lambda: (root / "state" / SOCKET_NAME).exists(),
        )
        try:
            with SshdSandbox(root / "ssh", root / "state") as sshd:
                print(f"relay python: {sshd.python}; cores: {os.cpu_count()}")
                asyncio.run(measure(url, sshd, args))
        finally:
            stop(router)
            stop(standin)


if __name__ == "__main__":
    main()
