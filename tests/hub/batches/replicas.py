"""Hub replicas on one database and one file store, and a real agent for their batches.

The agent is the real router (`hpc.router.server.serve_requests`, in this process) with the
local executor: a batch runs as a job script (slurm/batch.sh with the batch driver and the
stand-in server) on this machine. `AgentWatch` counts what the agent is asked, per route,
and can hold one request at a chosen point (a hub is then killed while it waits). A replica
is either in this process (`tests.hub.helpers.running_hub`) or `saia hub serve` as its own
process (killed with SIGKILL, never stopped cleanly).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from cloud_interface.relay import SOCKET_NAME
from hpc.batch.manager import BatchManager, Sink
from hpc.config import AgentConfig, ServiceConfig
from hpc.registry import BackendRegistry
from hpc.router.server import serve_requests
from hub.config import HubConfig, parse_config
from saia.base import protocol as wire
from tests.hpc.helpers import until

MODEL = "bulk"
ROUTES = {
    ("PUT", "input"): "input", ("POST", ""): "submit", ("GET", ""): "status",
    ("GET", "output"): "output", ("DELETE", ""): "forget", ("POST", "cancel"): "cancel",
}  # fmt: skip
Answer = Callable[[BatchManager, Sink, wire.RequestHead, bytes], Awaitable[None]]


class Gate:
    """Holds one request: `reached` once it waits, until `release`."""

    def __init__(self) -> None:
        self.reached, self.release = asyncio.Event(), asyncio.Event()


class HeldSink:
    """Passes the first piece of an answer on, then waits at the gate (mid-transfer)."""

    def __init__(self, sink: Sink, gate: Gate) -> None:
        self._sink, self._gate, self._sent = sink, gate, 0

    def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        self._sink.start(status, headers)

    async def send(self, data: bytes) -> None:
        half = max(1, len(data) // 2) if not self._sent else len(data)
        await self._sink.send(data[:half])
        self._sent += 1
        if self._sent == 1:
            self._gate.reached.set()
            await self._gate.release.wait()
        if data[half:]:
            await self._sink.send(data[half:])

    def finish(self) -> None:
        self._sink.finish()


class AgentWatch:
    def __init__(self, original: Answer) -> None:
        self.calls: Counter[str] = Counter()
        self._original = original
        self._gates: dict[str, Gate] = {}

    def hold(self, route: str) -> Gate:
        """Hold the next `route` request: a piece of input past the first (before it is
        written), a submit (after the job was submitted, before the answer), an output
        (after half of its first piece)."""
        gate = self._gates[route] = Gate()
        return gate

    async def answer(
        self, manager: BatchManager, sink: Sink, head: wire.RequestHead, body: bytes
    ) -> None:
        action = head.path.rpartition("/")[2] if head.path.count("/") > 3 else ""
        route = ROUTES.get((head.method, action), "other")
        self.calls[route] += 1
        gate = self._gates.get(route)
        offset = dict(head.headers).get("x-saia-offset")
        if gate is not None and route == "input" and offset != "0":
            del self._gates[route]
            gate.reached.set()
            await gate.release.wait()
        elif gate is not None and route == "submit":
            del self._gates[route]
            batch_id = head.path.split("/")[3]
            await manager.submit(batch_id, body)
            gate.reached.set()
            await gate.release.wait()
        elif gate is not None and route == "output":
            del self._gates[route]
            sink = HeldSink(sink, gate)
        await self._original(manager, sink, head, body)


@asynccontextmanager
async def running_agent(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[AgentWatch]:
    """The agent's router on `<state_dir>/agent.sock`; batch jobs run locally."""
    watch = AgentWatch(BatchManager.answer)

    async def answer(
        manager: BatchManager, sink: Sink, head: wire.RequestHead, body: bytes
    ) -> None:
        await watch.answer(manager, sink, head, body)

    monkeypatch.setattr(BatchManager, "answer", answer)
    service = ServiceConfig(name=MODEL, model=MODEL, template="standin")
    config = AgentConfig(state_dir=state_dir, executor="local", services=[service])
    task = asyncio.create_task(serve_requests(config, BackendRegistry()))
    try:
        await until((state_dir / SOCKET_NAME).exists, 30, "the agent's socket")
        yield watch
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def replica_settings(
    base: Path, name: str, database_url: str, agent_dir: Path, **batches: Any
) -> dict[str, Any]:
    """One replica's configuration: its own data dir, the shared database and file store."""
    site = {"socket": str(agent_dir / SOCKET_NAME)}
    settings = {"poll_interval": 0.3, "lease_time": 2, "files_dir": str(base / "files")}
    return {
        "data_dir": str(base / name), "database_url": database_url, "usage_flush_interval": 0.2,
        "upstreams": {"cluster": {"kind": "hpc", "sites": [site]}},
        "models": [{"id": MODEL, "upstream": "cluster"}],
        "batches": settings | batches,
    }  # fmt: skip


def replica_config(*args: Any, **batches: Any) -> HubConfig:
    return parse_config(replica_settings(*args, **batches))


def start_replica(settings: dict[str, Any], port: int, folder: Path) -> subprocess.Popen[bytes]:
    """`saia hub serve` as its own process (stopped by pid)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "hub.yaml"
    config.write_text(json.dumps(settings))  # JSON is YAML
    argv = [sys.executable, "-c", "from saia.cli import main; main()", "hub", "serve"]
    argv += ["-c", str(config), "--port", str(port)]
    with open(folder / "hub.log", "wb") as output:
        return subprocess.Popen(
            argv, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )


def requests_file(count: int, pad: int = 0) -> bytes:
    """`count` requests; `pad` more words in each prompt (a larger file, more pieces)."""
    lines = []
    for i in range(count):
        text = f"w{i} x y" + " p" * pad
        body = {"model": MODEL, "max_tokens": 4,
                "messages": [{"role": "user", "content": text}]}  # fmt: skip
        lines.append({"custom_id": f"row-{i}", "method": "POST",
                      "url": "/v1/chat/completions", "body": body})  # fmt: skip
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)
