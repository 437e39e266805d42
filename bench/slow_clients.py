"""Slow senders against the hub's bounded uvicorn protocol (hub/server.py), and its cost.

    .venv/bin/python -P bench/slow_clients.py [--requests 2000]

(-P: bench/hub.py would otherwise shadow the hub package.)

In one process on 127.0.0.1, with a trivial ASGI app (no database, no upstream) so only
the HTTP layer is measured:
1. with the default `client_timeouts`, when a client trickling its head (a byte a second)
   and one that stalls its body are cut off, and the latency of requests others send
   meanwhile;
2. the CPU time per keep-alive request (client and server share the process; CPU time,
   not wall time, so that other load on the machine counts less), uvicorn's plain
   httptools protocol vs the bounded one, in alternating rounds.
Every loop is bounded. Prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

import uvicorn

from hub.config import ClientTimeoutsConfig
from hub.server import uvicorn_config
from saia.sandbox.process import free_port

HEAD = b"POST / HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    headers = [(b"content-length", b"2")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"ok"})


@contextlib.asynccontextmanager
async def serving(bounded: bool) -> AsyncIterator[int]:
    port = free_port()
    config = uvicorn_config(app, "127.0.0.1", port, log_level="warning")
    config.lifespan = "off"
    if not bounded:
        config.http = "httptools"
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(10):
        while not server.started:  # noqa: ASYNC110 (uvicorn signals nothing)
            await asyncio.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        async with asyncio.timeout(70):
            await task


async def cut_off_after(port: int, first: bytes, trickle: bytes, pause_s: float) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    writer.write(first)

    async def send_slowly() -> None:
        with contextlib.suppress(ConnectionError):
            for byte in trickle:
                await asyncio.sleep(pause_s)
                writer.write(bytes([byte]))
                await writer.drain()

    sending = asyncio.create_task(send_slowly())
    try:
        async with asyncio.timeout(120):
            answer = await reader.read()
    except ConnectionError:
        answer = b""
    sending.cancel()
    writer.close()
    status = answer.split(b"\r\n", 1)[0].decode() or "closed, no answer"
    return f"{time.monotonic() - started:.1f} s ({status})"


async def one_request(port: int) -> float:
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(HEAD + b"Content-Length: 2\r\nConnection: close\r\n\r\n{}")
    await reader.read()
    writer.close()
    return time.perf_counter() - started


async def slow_clients() -> None:
    defaults = ClientTimeoutsConfig()
    print(f"bounds: head {defaults.head:.0f} s, body_idle {defaults.body_idle:.0f} s")
    async with serving(bounded=True) as port:
        head = cut_off_after(port, b"", HEAD + b"Content-Length: 2\r\n\r\n{}", 1.0)
        body = cut_off_after(port, HEAD + b"Content-Length: 10\r\n\r\n{", b"", 0)
        slow = asyncio.gather(head, body)
        others = []
        for _ in range(20):
            others.append(await one_request(port))
            await asyncio.sleep(0.2)
        head_result, body_result = await slow
    print(f"head trickled at 1 byte/s: cut off after {head_result}")
    print(f"body stalled after 1 byte: cut off after {body_result}")
    median = statistics.median(others) * 1000
    print(f"20 other requests meanwhile: all answered, median {median:.2f} ms")


async def per_request(port: int, count: int) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = HEAD + b"Content-Length: 2\r\n\r\n{}"
    started = time.process_time()
    for _ in range(count):
        writer.write(request)
        await reader.readuntil(b"\r\n\r\nok")
    elapsed = time.process_time() - started
    writer.close()
    return elapsed / count * 1e6


async def overhead(count: int) -> None:
    figures: dict[bool, list[float]] = {False: [], True: []}
    for round_ in range(5):
        for bounded in (False, True) if round_ % 2 else (True, False):
            async with serving(bounded) as port:
                figures[bounded].append(await per_request(port, count))
    plain, bounded = (statistics.median(figures[b]) for b in (False, True))
    print(
        f"{count} keep-alive POSTs, median of 5 rounds, CPU: plain httptools {plain:.1f} "
        f"us/request, bounded {bounded:.1f} us/request ({bounded - plain:+.1f})"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    await slow_clients()
    await overhead(args.requests)


if __name__ == "__main__":
    asyncio.run(main())
