"""What a TLS handshake to a model server costs the router: saia's HTTP/1.1 client (the
router's) against the stand-in, one small request at a time, four ways in alternating
rounds: plain HTTP on a new connection each, TLS pinned to the server's own certificate on
a new connection each (one handshake per request), and both on one keep-alive connection
(the usual case: no handshake). Prints figures only.

    .venv/bin/python -m bench.tls_handshake [--requests 300] [--rounds 3]

Client CPU is this process's (time.process_time); the stand-in's from /proc. Loopback
only, so the latency shows CPU, not the network's round trips (a handshake adds one
round trip on a real network with TLS 1.3).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

from bench.hop import cpu_seconds, healthy, start_process
from saia.base.http11 import HttpClient
from saia.base.pinned_tls import pinned_context
from saia.sandbox.certs import make_certificate
from saia.sandbox.process import free_port, stop_process

MODEL = "tls-bench"
BODY = json.dumps(
    {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
).encode()
HEADERS = [("content-type", "application/json")]
Call = Callable[[], Awaitable[None]]


def caller(client: HttpClient, url: str, tls: ssl.SSLContext | None) -> Call:
    async def call() -> None:
        response = await client.send(url, "POST", "/v1/chat/completions", HEADERS, BODY, tls=tls)
        try:
            body = b"".join([chunk async for chunk in response.chunks(30)])
        finally:
            client.release(response)
        assert response.status == 200, body

    return call


Figures = dict[str, dict[str, list[float]]]


async def measure(
    urls: dict[str, str], tls: ssl.SSLContext, pids: dict[str, int], args: argparse.Namespace
) -> Figures:
    fresh = HttpClient(max_idle_per_origin=0)  # every request on a new connection
    kept = HttpClient()
    async with fresh, kept:
        calls = {
            "plain, new connection": caller(fresh, urls["plain"], None),
            "TLS, new connection": caller(fresh, urls["tls"], tls),
            "plain, kept alive": caller(kept, urls["plain"], None),
            "TLS, kept alive": caller(kept, urls["tls"], tls),
        }
        servers = (pids["plain"], pids["tls"], pids["plain"], pids["tls"])
        server_of = dict(zip(calls, servers, strict=True))
        figures: Figures = {name: {"ms": [], "client": [], "server": []} for name in calls}
        for call in calls.values():
            for _ in range(10):  # warm-up
                await call()
        for _ in range(args.rounds):
            for name, call in calls.items():
                pid = server_of[name]
                cpu, server = time.process_time(), cpu_seconds(pid)
                for _ in range(args.requests):
                    start = time.perf_counter()
                    await call()
                    figures[name]["ms"].append(1000 * (time.perf_counter() - start))
                figures[name]["client"].append(1000 * (time.process_time() - cpu) / args.requests)
                figures[name]["server"].append(1000 * (cpu_seconds(pid) - server) / args.requests)
    return figures


def report(figures: Figures, args: argparse.Namespace) -> None:
    print(f"{args.rounds} alternating rounds of {args.requests} sequential requests each:")
    for name, got in figures.items():
        print(
            f"  {name:22s} latency median {statistics.median(got['ms']):5.2f} ms"
            f"  p99 {sorted(got['ms'])[int(0.99 * len(got['ms']))]:5.2f} ms"
            f"   CPU per request: client {statistics.median(got['client']):5.3f} ms"
            f"  server {statistics.median(got['server']):5.3f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="saia-bench-tls-") as tmp:
        cert = make_certificate(Path(tmp) / "tls")
        tls = pinned_context(cert.pem)
        servers, urls, pids = [], {}, {}
        for name, extra in (
            ("plain", []),
            ("tls", ["--ssl-keyfile", str(cert.key_file), "--ssl-certfile", str(cert.cert_file)]),
        ):
            port = free_port()
            url = urls[name] = f"{'https' if extra else 'http'}://127.0.0.1:{port}"
            argv = [sys.executable, "-m", "hpc.standin", "--host", "127.0.0.1"]
            argv += ["--port", str(port), "--model-name", MODEL, *extra]
            verify: ssl.SSLContext | bool = tls if extra else True
            servers.append(start_process(argv, partial(healthy, url, verify)))
            pids[name] = servers[-1].pid
        try:
            print(f"cores: {os.cpu_count()}; one stand-in plain, one with TLS (EC P-256)")
            report(asyncio.run(measure(urls, tls, pids, args)), args)
        finally:
            for server in servers:
                stop_process(server, 10)


if __name__ == "__main__":
    main()
