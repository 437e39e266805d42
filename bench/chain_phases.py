"""The phases of `python -m bench`, each over the three routes in alternating rounds.

Routes: `direct` (the stand-in itself), `openai` (hub -> stand-in, an `openai` upstream)
and `chain` (hub -> sshd -> relay -> agent -> stand-in). Each phase returns plain figures
(dicts of numbers) for the table and the JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from bench.chain_load import (
    AiohttpClient,
    Path,
    SaiaClient,
    Send,
    at_once,
    chat_body,
    concurrent,
    sequential,
    soak,
)
from bench.chain_meter import CpuMeter, median, open_files, percentile, status_kb
from bench.chain_setup import SLOW_DELAY, Chain

ROUTES = ("direct", "openai", "chain")
SHORT = 4  # tokens of a small chat completion
Figures = dict[str, Any]


def route_path(chain: Chain, route: str, service: str) -> Path:
    if route == "direct":
        return Path(route, chain.backends[service])
    hub = "hub_chain" if route == "chain" else "hub_openai"
    return Path(route, chain.urls[hub], chain.keys[hub])


def rotated(round_: int) -> tuple[str, ...]:
    """The routes in a different order each round (no route always runs after another)."""
    shift = round_ % len(ROUTES)
    return ROUTES[shift:] + ROUTES[:shift]


def latency(times: list[float]) -> Figures:
    return {"p50": median(times), "p99": percentile(times, 0.99), "n": len(times)}


async def warm_up(send: Send, chain: Chain) -> None:
    for route in ROUTES:
        for service in ("instant", "paced"):
            body = chat_body(service, SHORT, stream=service == "paced")
            await concurrent(send, route_path(chain, route, service), body, 8, 64)


async def phase_sequential(send: Send, chain: Chain, count: int) -> Figures:
    times: dict[str, list[float]] = {route: [] for route in ROUTES}
    errors = 0
    body = chat_body("instant", SHORT, stream=False)
    for round_ in range(max(1, count // 20)):
        for route in rotated(round_):
            batch = await sequential(send, route_path(chain, route, "instant"), body, 20)
            times[route] += batch.ok_times_ms()
            errors += batch.errors
    figures: Figures = {route: latency(values) for route, values in times.items()}
    figures["errors"] = errors
    return figures


async def phase_c64(send: Send, chain: Chain, width: int, total: int, rounds: int) -> Figures:
    parts = {k: v for k, v in chain.pids().items() if k != "backends"}
    meters = {route: CpuMeter(parts) for route in ROUTES}
    times: dict[str, list[float]] = {route: [] for route in ROUTES}
    rates: dict[str, list[float]] = {route: [] for route in ROUTES}
    errors = 0
    body = chat_body("instant", SHORT, stream=False)
    for round_ in range(rounds):
        for route in rotated(round_):
            meters[route].begin()
            batch = await concurrent(send, route_path(chain, route, "instant"), body, width, total)
            meters[route].end()
            times[route] += batch.ok_times_ms()
            rates[route].append(total / batch.seconds)
            errors += batch.errors
    figures: Figures = {"errors": errors, "width": width}
    for route in ROUTES:
        cpu = meters[route].ms_per_request(total * rounds)
        figures[route] = latency(times[route]) | {"rps": median(rates[route]), "cpu_ms": cpu}
    return figures


async def phase_streaming(send: Send, chain: Chain, count: int, tokens: int) -> Figures:
    firsts: dict[str, list[float]] = {route: [] for route in ROUTES}
    rates: dict[str, list[float]] = {route: [] for route in ROUTES}
    errors = 0
    body = chat_body("paced", tokens, stream=True)
    for round_ in range(max(1, count // 5)):
        for route in rotated(round_):
            batch = await sequential(send, route_path(chain, route, "paced"), body, 5)
            for answer in batch.answers:
                if not answer.ok:
                    errors += 1
                    continue
                firsts[route].append(answer.first * 1000)
                rates[route].append(tokens / max(1e-6, answer.total - answer.first))
    figures: Figures = {"errors": errors, "tokens": tokens}
    for route in ROUTES:
        figures[route] = {"ttft_p50": median(firsts[route]), "tps": median(rates[route])}
    return figures


async def phase_clients(chain: Chain, count: int, width: int, tokens: int) -> Figures:
    """saia's HTTP/1.1 client against aiohttp's, direct to the stand-in: this process's CPU
    per request (sequential), p99 and requests/s at `width` concurrent, one stream's tokens/s.
    """
    clients: dict[str, SaiaClient | AiohttpClient] = {
        "http11": SaiaClient(),
        "aiohttp": AiohttpClient(),
    }
    small = chat_body("instant", SHORT, stream=False)
    streamed = chat_body("paced", tokens, stream=True)
    cpu: dict[str, list[float]] = {name: [] for name in clients}
    c64: dict[str, list[float]] = {name: [] for name in clients}
    rps: dict[str, list[float]] = {name: [] for name in clients}
    tps: dict[str, list[float]] = {name: [] for name in clients}
    try:
        for round_ in range(3):
            for name in list(clients)[:: 1 if round_ % 2 else -1]:
                send = clients[name].send
                started = time.process_time()
                await sequential(send, route_path(chain, "direct", "instant"), small, count)
                cpu[name].append((time.process_time() - started) * 1000 / count)
                path = route_path(chain, "direct", "instant")
                batch = await concurrent(send, path, small, width, count)
                c64[name] += batch.ok_times_ms()
                rps[name].append(count / batch.seconds)
                one = await sequential(send, route_path(chain, "direct", "paced"), streamed, 2)
                tps[name] += [tokens / max(1e-6, a.total - a.first) for a in one.answers if a.ok]
    finally:
        for client in clients.values():
            await client.aclose()
    return {
        name: {
            "cpu_ms": median(cpu[name]),
            "c64_p50": median(c64[name]),
            "c64_p99": percentile(c64[name], 0.99),
            "rps": median(rps[name]),
            "stream_tps": median(tps[name]),
        }
        for name in clients
    }


@contextlib.asynccontextmanager
async def peak_rss(pids: dict[str, int]) -> AsyncIterator[dict[str, int]]:
    """The largest VmRSS (kB) of each process while the block runs, sampled every 0.5 s."""
    peaks = dict.fromkeys(pids, 0)

    async def sample() -> None:
        while True:
            for name, pid in pids.items():
                peaks[name] = max(peaks[name], status_kb(pid, "VmRSS"))
            await asyncio.sleep(0.5)

    task = asyncio.create_task(sample())
    try:
        yield peaks
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for name, pid in pids.items():
            peaks[name] = max(peaks[name], status_kb(pid, "VmRSS"))


def watched(chain: Chain) -> dict[str, int]:
    pids = chain.pids()
    return {"hub": pids["hub_chain"][0], "agent": pids["agent"][0]}


async def phase_streams(send: Send, chain: Chain, count: int, tokens: int) -> Figures:
    """`count` long streams at once through the chain (one SSH connection)."""
    body = chat_body("slow", tokens, stream=True)
    length = tokens * SLOW_DELAY
    ramp = min(length / 3, count / 500)  # all have started long before the first ends
    path = route_path(chain, "chain", "slow")
    async with peak_rss(watched(chain)) as peaks:
        batch = await at_once(send, path, body, count, ramp, length * 3 + 120)
    short = sum(1 for a in batch.answers if a.ok and a.events < tokens)
    return {
        "count": count,
        "tokens": tokens,
        "errors": batch.errors + short,
        "error_kinds": batch.error_kinds() | ({"fewer tokens": short} if short else {}),
        "seconds": batch.seconds,
        "hub_rss_mb": peaks["hub"] / 1024,
        "agent_rss_mb": peaks["agent"] / 1024,
    }


def resources(pids: dict[str, int]) -> Figures:
    return {
        name: {"rss_kb": status_kb(pid, "VmRSS"), "fds": open_files(pid)}
        for name, pid in pids.items()
    }


async def phase_soak(send: Send, chain: Chain, args: argparse.Namespace) -> Figures:
    """`args.soak_width` workers for `args.soak` s; RSS and open files before and after
    (both after a warm-up at the same width and a pause, so pools are as full)."""
    body = chat_body("slow", args.soak_tokens, stream=True)
    path = route_path(chain, "chain", "slow")
    pids = watched(chain)
    await soak(send, path, body, args.soak_width, min(30.0, max(3.0, args.soak / 10)))
    await asyncio.sleep(2)
    before = resources(pids)
    async with peak_rss(pids) as peaks:
        batch = await soak(send, path, body, args.soak_width, args.soak)
    await asyncio.sleep(2)
    after = resources(pids)
    growth = {
        name: 100 * (after[name]["rss_kb"] - before[name]["rss_kb"]) / before[name]["rss_kb"]
        for name in pids
    }
    return {
        "seconds": args.soak,
        "width": args.soak_width,
        "requests": len(batch.answers),
        "errors": batch.errors,
        "error_kinds": batch.error_kinds(),
        "before": before,
        "after": after,
        "peak_rss_mb": {name: kb / 1024 for name, kb in peaks.items()},
        "rss_growth_pct": max(growth.values()),
        "fd_growth": sum(after[n]["fds"] - before[n]["fds"] for n in pids),
    }
