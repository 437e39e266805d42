"""The real vLLM for the CPU on the tiny model: start time, memory, latency, stop time.
Prints figures; asserts nothing.

    .venv/bin/python bench/vllm_cpu.py [--requests 20] [--concurrent 4] [--max-tokens 32]

Uses the venv and model of `python -m saia.sandbox.vllm ensure` (made on first use) and
runs `vllm serve` on a free 127.0.0.1 port in its own process group, stopped by pid.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from saia.sandbox.process import free_port
from saia.sandbox.vllm import VllmInstall, ensure

START_LIMIT = 600.0
KEY = "bench-key"


def tree_rss_mb(root: int) -> float:
    """Resident memory of a process and all its descendants, in MB."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            status = (entry / "status").read_text()
        except OSError:
            continue
        pid = int(entry.name)
        children.setdefault(int(fields[1]), []).append(pid)
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss[pid] = int(line.split()[1])
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += children.get(pid, [])
    return total / 1024


def start_server(install: VllmInstall, port: int, cache: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        "VLLM_CACHE_ROOT": str(cache),
        "VLLM_API_KEY": KEY,
    }
    argv = [str(install.vllm), "serve", str(install.model_dir), "--served-model-name", "tiny"]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--max-model-len", "256"]
    argv += ["--dtype", "float32", "--enforce-eager"]
    log = (cache / "serve.log").open("wb")
    return subprocess.Popen(
        argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


async def wait_healthy(client: httpx.AsyncClient, server: subprocess.Popen[bytes]) -> float:
    started = time.monotonic()
    async with asyncio.timeout(START_LIMIT):
        while True:
            if server.poll() is not None:
                raise SystemExit(
                    f"vllm serve exited with {server.returncode} before it was healthy"
                )
            try:
                if (await client.get("/health")).status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.25)


async def one_request(client: httpx.AsyncClient, max_tokens: int) -> tuple[float, float]:
    """(time to first streamed token, total time) of one streamed chat completion."""
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": max_tokens,
        "ignore_eos": True,  # vLLM's extension: exactly max_tokens, so throughput is exact
        "stream": True,
    }
    started = time.monotonic()
    first = 0.0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: ") and not first:
                first = time.monotonic() - started
    return first, time.monotonic() - started


async def measure(args: argparse.Namespace, install: VllmInstall, cache: Path) -> None:
    port = free_port()
    server = start_server(install, port, cache)
    headers = {"Authorization": f"Bearer {KEY}"}
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(
            base_url=base, headers=headers, timeout=120, trust_env=False
        ) as client:
            print(f"healthy after        {await wait_healthy(client, server):7.1f} s")
            print(f"RSS of the tree      {tree_rss_mb(server.pid):7.0f} MB (idle)")
            results = []
            for _ in range(args.requests):
                results.append(await one_request(client, args.max_tokens))
            report("sequential", results, args.max_tokens)
            gate = asyncio.Semaphore(args.concurrent)

            async def gated() -> tuple[float, float]:
                async with gate:
                    return await one_request(client, args.max_tokens)

            started = time.monotonic()
            results = await asyncio.gather(*(gated() for _ in range(args.requests)))
            wall = time.monotonic() - started
            report(f"{args.concurrent} concurrent", results, args.max_tokens)
            print(f"  throughput         {args.requests * args.max_tokens / wall:7.1f} tokens/s")
            print(f"RSS of the tree      {tree_rss_mb(server.pid):7.0f} MB (after load)")
    finally:
        stopped = time.monotonic()
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        print(
            f"stopped by SIGTERM in {time.monotonic() - stopped:6.1f} s (exit {server.returncode})"
        )


def report(label: str, results: list[tuple[float, float]], max_tokens: int) -> None:
    firsts = [r[0] * 1000 for r in results]
    totals = [r[1] * 1000 for r in results]
    print(f"{label}: {len(results)} streamed chats of {max_tokens} tokens")
    print(f"  first token median {statistics.median(firsts):7.1f} ms, max {max(firsts):.1f} ms")
    print(f"  whole reply median {statistics.median(totals):7.1f} ms, max {max(totals):.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--concurrent", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    started = time.monotonic()
    install = ensure()
    print(f"venv + model ready   {time.monotonic() - started:7.1f} s ({install.venv})")
    with tempfile.TemporaryDirectory(prefix="saia-bench-vllm-") as cache:
        asyncio.run(measure(args, install, Path(cache)))


if __name__ == "__main__":
    main()
