"""What a hostile hub can make the agent's router hold: the three attacks of issue 9 item 4
against one connection, each with the Python memory peak (tracemalloc) while it runs.
Prints figures only.

    .venv/bin/python bench/hostile_hub.py [--scale 1.0]

Runs in this process on a Unix socketpair with the agent's default limits; the hub side
writes with drain(), so the figures are what the agent holds. --scale 1 is the issue's
size (10,000 heads, 300 streams x 1 MiB, 180 MB of PING); smaller scales run faster.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpc.config import AgentConfig, ServiceConfig
from hpc.registry import BackendRegistry
from hpc.router.server import Router
from saia.base import protocol as wire

MiB = 1024 * 1024


def heads(count: int) -> Iterator[bytes]:
    headers = [(f"x-h{i}", "v" * 480) for i in range(120)]  # a ~60 KiB head
    for i in range(count):
        yield wire.encode_request(2 * i + 1, wire.RequestHead("m", "POST", "/v1/x", headers))


def windows(count: int) -> Iterator[bytes]:
    chunk = b"b" * wire.MAX_DATA
    for i in range(count):
        yield wire.encode_request(2 * i + 1, wire.RequestHead("m", "POST", "/v1/x", []))
        for _ in range(wire.INITIAL_WINDOW // wire.MAX_DATA):
            yield wire.encode_data(2 * i + 1, chunk)


def pings(total: int) -> Iterator[bytes]:
    block = wire.encode_frame(wire.PING, 0, b"12345678") * 10_000
    for _ in range(total // len(block)):
        yield block


async def attack(frames: Iterator[bytes]) -> tuple[int, float]:
    """Peak traced bytes while one connection receives `frames` (and reads nothing)."""
    config = AgentConfig(
        state_dir=Path("/nonexistent"), services=[ServiceConfig(name="m", model="m")]
    )
    router = Router(lambda: config, BackendRegistry(), None)  # type: ignore[arg-type]
    ours, theirs = socket.socketpair()
    reader, writer = await asyncio.open_unix_connection(sock=ours)
    _, hub = await asyncio.open_unix_connection(sock=theirs)
    tracemalloc.start()
    started = time.monotonic()
    task = asyncio.create_task(router.handle_connection(reader, writer))
    try:
        hub.write(wire.encode_hello())
        for frame in frames:
            hub.write(frame)
            try:
                async with asyncio.timeout(5):  # the agent stopped reading: that is the bound
                    await hub.drain()
            except TimeoutError:
                break
        await asyncio.sleep(0.5)  # let it take what it read
        return tracemalloc.get_traced_memory()[1], time.monotonic() - started
    finally:
        tracemalloc.stop()
        hub.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def main(scale: float) -> None:
    cases = [
        (f"{int(10_000 * scale)} REQUEST heads of 60 KiB, no END", heads(int(10_000 * scale))),
        (f"{int(300 * scale)} streams x 1 MiB initial window", windows(int(300 * scale))),
        (f"{int(180 * scale)} MB of PING, PONGs never read", pings(int(180e6 * scale))),
    ]
    for name, frames in cases:
        peak, seconds = await attack(frames)
        print(f"  {name:45s} peak {peak / MiB:7.1f} MiB  ({seconds:.1f} s)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0)
    asyncio.run(main(parser.parse_args().scale))
