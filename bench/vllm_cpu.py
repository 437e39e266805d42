"""SmolLM2-135M-Instruct on the real vLLM for the CPU, direct and through the whole chain.
Prints figures; asserts nothing.

    .venv/bin/python bench/vllm_cpu.py [--requests 8] [--concurrent 4] [--max-tokens 64]

Starts `saia demo --vllm` (Slurm job running `vllm serve`, sshd with the forced-command
key, relay, agent, hub) in its own process group, then sends the same streamed chats to the
one vLLM backend directly (its endpoint and per-job key from the demo's state dir) and
through the hub (hub -> SSH -> relay -> agent's router -> backend): time to first token,
decode rate per stream, throughput with several streams at once. Stopped by pid (SIGINT,
as Ctrl-C) at the end. Every loop is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import selectors
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpc.jobs.system import read_endpoint
from saia.sandbox.demo_config import VLLM_MODEL_ID
from saia.sandbox.process import free_port
from saia.sandbox.vllm import ensure

START_LIMIT = 900.0
STOP_LIMIT = 120.0
QUESTION = "Explain in a few sentences what a compute cluster is."


@dataclass(frozen=True)
class Target:
    label: str
    base_url: str  # ends in /v1
    key: str
    verify: ssl.SSLContext | bool = True  # the job's own certificate when it serves TLS


@dataclass(frozen=True)
class Reply:
    first_token_s: float
    total_s: float
    tokens: int

    @property
    def decode_rate(self) -> float:
        """Tokens per second after the first one (the prompt's prefill is not in it)."""
        return (self.tokens - 1) / max(self.total_s - self.first_token_s, 1e-9)


def read_ready(demo: subprocess.Popen[bytes], limit_s: float) -> dict[str, str]:
    """SAIA_BASE_URL and SAIA_API_KEY from the demo's output, once it printed them."""
    assert demo.stdout is not None
    fd, pending = demo.stdout.fileno(), b""
    found: dict[str, str] = {}
    deadline = time.monotonic() + limit_s
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while len(found) < 2:
            if time.monotonic() > deadline or demo.poll() is not None:
                raise SystemExit(f"the demo did not come up (exit {demo.poll()})")
            if selector.select(timeout=1.0):
                pending += os.read(fd, 65536)
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    name, _, value = line.decode().partition("=")
                    if name in ("SAIA_BASE_URL", "SAIA_API_KEY"):
                        found[name] = value
    return found


def backend_target(root: Path) -> Target:
    """The vLLM job's own endpoint and key, as the agent reads them."""
    state_dir = root / "agent-state"
    for endpoint in sorted((state_dir / "jobs").glob("*/endpoint.json")):
        found = read_endpoint(state_dir, endpoint.parent.name)
        if found is None:
            continue
        key = (endpoint.parent / "api_key").read_text().strip()
        return Target("direct", f"{found.url}/v1", key, found.tls() or True)
    raise SystemExit(f"no endpoint.json under {root}/agent-state/jobs")


def vllm_rss_mb(port: int) -> float:
    """Resident memory of the `vllm serve` on `port` and its children, in MB (pages shared
    between them counted in each)."""
    children: dict[int, list[int]] = {}
    parent: dict[int, int] = {}
    rss: dict[int, int] = {}
    serving = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            status = (entry / "status").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        pid = int(entry.name)
        parent[pid] = int(fields[1])
        children.setdefault(parent[pid], []).append(pid)
        rss[pid] = next((int(x.split()[1]) for x in status.splitlines() if x[:6] == "VmRSS:"), 0)
        if b"serve" in argv and str(port).encode() in argv:
            serving.add(pid)
    total, todo = 0, [pid for pid in serving if parent[pid] not in serving]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += children.get(pid, [])
    return total / 1024


async def one_chat(client: httpx.AsyncClient, max_tokens: int) -> Reply:
    body = {
        "model": VLLM_MODEL_ID,
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": max_tokens,
        "ignore_eos": True,  # vLLM's extension: exactly max_tokens, so rates are exact
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started, first, tokens = time.monotonic(), 0.0, 0
    async with client.stream("POST", "/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content") and not first:
                first = time.monotonic() - started
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return Reply(first, time.monotonic() - started, tokens)


async def measure(target: Target, args: argparse.Namespace) -> None:
    headers = {"Authorization": f"Bearer {target.key}"}
    async with httpx.AsyncClient(
        base_url=target.base_url,
        headers=headers,
        timeout=300,
        trust_env=False,
        verify=target.verify,
    ) as client:
        await one_chat(client, 4)  # warm-up: the first request pays one-off costs
        replies = [await one_chat(client, args.max_tokens) for _ in range(args.requests)]
        report(f"{target.label}, one stream at a time", replies)
        gate = asyncio.Semaphore(args.concurrent)

        async def gated() -> Reply:
            async with gate:
                return await one_chat(client, args.max_tokens)

        started = time.monotonic()
        replies = await asyncio.gather(*(gated() for _ in range(args.requests)))
        wall = time.monotonic() - started
        report(f"{target.label}, {args.concurrent} streams at once", replies)
        print(f"  throughput           {sum(r.tokens for r in replies) / wall:7.1f} tokens/s")


def report(label: str, replies: list[Reply]) -> None:
    firsts = [r.first_token_s * 1000 for r in replies]
    print(f"{label}: {len(replies)} streamed chats of {replies[0].tokens} tokens")
    print(f"  first token  median {statistics.median(firsts):7.0f} ms, max {max(firsts):.0f} ms")
    print(
        f"  decode rate  median {statistics.median(r.decode_rate for r in replies):7.1f} tokens/s"
    )
    print(f"  whole reply  median {statistics.median(r.total_s for r in replies):7.2f} s")


def run(args: argparse.Namespace, root: Path) -> None:
    argv = [sys.executable, "-m", "saia", "demo", "--vllm", "--port", str(free_port())]
    started = time.monotonic()
    demo = subprocess.Popen(
        [*argv, "--dir", str(root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        found = read_ready(demo, START_LIMIT)
        print(f"whole chain ready    {time.monotonic() - started:7.1f} s (saia demo --vllm)")
        direct = backend_target(root)
        port = int(direct.base_url.rsplit(":", 1)[1].removesuffix("/v1"))
        print(f"RSS of vllm serve    {vllm_rss_mb(port):7.0f} MB (idle)")
        chain = Target("chain", found["SAIA_BASE_URL"], found["SAIA_API_KEY"])
        for target in (direct, chain):
            asyncio.run(measure(target, args))
        print(f"RSS of vllm serve    {vllm_rss_mb(port):7.0f} MB (after load)")
    finally:
        demo.send_signal(signal.SIGINT)  # as Ctrl-C: the demo stops its job and the rest
        try:
            demo.wait(timeout=STOP_LIMIT)
        except subprocess.TimeoutExpired:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--concurrent", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    started = time.monotonic()
    ensure()
    print(f"venv + models ready  {time.monotonic() - started:7.1f} s")
    with tempfile.TemporaryDirectory(prefix="saia-bench-vllm-") as root:
        run(args, Path(root))


if __name__ == "__main__":
    main()
