"""`python -m bench`: the whole chain against a direct call, in one run, on loopback.

    .venv/bin/python -m bench [--soak 600] [--streams-large 5000] [--tiny]

Run from the repository root (`-m` keeps bench/hub.py from shadowing the hub package).
Starts the real chain (bench/chain_setup.py: agent with stand-in jobs, sshd with the
forced-command key and the relay, a hub over that sshd, a hub with openai upstreams to the
same stand-ins) and measures, over the three routes in alternating rounds: sequential small
chat completions, 64 concurrent (requests/s, p50/p99, CPU ms per request of each process),
one stream (time to first token, tokens/s), saia's HTTP/1.1 client against aiohttp's,
a soak, and thousands of long streams at once over the one SSH connection (errors, peak
RSS). Prints a table, writes bench/results/latest.json, and prints one JSON line last.
Raises the open-files limit to the hard limit (each of 5000 streams holds a socket in the
client, the hub, the agent and the stand-in). Every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from bench import chain_phases as phases
from bench.chain_load import SaiaClient
from bench.chain_meter import load_average
from bench.chain_setup import Chain, raise_open_files

RESULTS = Path(__file__).resolve().parent / "results"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--sequential", type=int, default=400, help="small requests per route")
    add("--concurrent", type=int, default=64, help="requests in flight")
    add("--requests", type=int, default=1000, help="requests per concurrent round")
    add("--rounds", type=int, default=3, help="alternating concurrent rounds")
    add("--streams", type=int, default=40, help="single streams per route")
    add("--stream-tokens", type=int, default=200)
    add("--streams-small", type=int, default=1000)
    add("--streams-large", type=int, default=5000)
    add("--long-tokens", type=int, default=30, help="tokens of each long stream (1 s each)")
    add("--soak", type=float, default=120.0, help="seconds (the issue's soak: 600)")
    add("--soak-width", type=int, default=200)
    add("--soak-tokens", type=int, default=2)
    add("--tiny", action="store_true", help="tiny sizes: a check of the wiring, not figures")
    add("--output", type=Path, default=RESULTS / "latest.json")
    add("--keep", type=Path, help="run in this directory and keep it (logs, configs)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.sequential, args.requests, args.rounds, args.streams = 20, 64, 1, 5
        args.stream_tokens, args.streams_small, args.streams_large = 20, 10, 20
        args.long_tokens, args.soak, args.soak_width = 3, 3.0, 10
    return args


def new_loop() -> Callable[[], asyncio.AbstractEventLoop]:
    try:  # the hub and the agent run on uvloop: so does the client, to take little CPU
        import uvloop

        return uvloop.new_event_loop
    except ImportError:
        return asyncio.new_event_loop


async def measure(chain: Chain, args: argparse.Namespace) -> dict[str, Any]:
    client = SaiaClient()
    send = client.send
    figures: dict[str, Any] = {}
    try:
        await phases.warm_up(send, chain)
        figures["sequential"] = await phases.phase_sequential(send, chain, args.sequential)
        figures["c64"] = await phases.phase_c64(
            send, chain, args.concurrent, args.requests, args.rounds
        )
        figures["streaming"] = await phases.phase_streaming(
            send, chain, args.streams, args.stream_tokens
        )
        figures["clients"] = await phases.phase_clients(
            chain, max(20, args.sequential // 2), args.concurrent, args.stream_tokens
        )
        figures["soak"] = await phases.phase_soak(send, chain, args)
        for size in ("small", "large"):
            count = getattr(args, f"streams_{size}")
            figures[f"streams_{size}"] = await phases.phase_streams(
                send, chain, count, args.long_tokens
            )
    finally:
        await client.aclose()
    return figures


def summary(figures: dict[str, Any]) -> dict[str, Any]:
    seq, c64, streaming = figures["sequential"], figures["c64"], figures["streaming"]
    chain_cpu = c64["chain"]["cpu_ms"]
    small, large, soak = figures["streams_small"], figures["streams_large"], figures["soak"]
    line = {
        "overhead_p50_ms": seq["chain"]["p50"] - seq["direct"]["p50"],
        "overhead_p99_ms": seq["chain"]["p99"] - seq["direct"]["p99"],
        "openai_overhead_p50_ms": seq["openai"]["p50"] - seq["direct"]["p50"],
        "c64_p99_over_p50": c64["chain"]["p99"] / c64["chain"]["p50"],
        "direct_c64_p99_over_p50": c64["direct"]["p99"] / c64["direct"]["p50"],
        "rps_ratio_c64": c64["chain"]["rps"] / c64["direct"]["rps"],
        "chain_cpu_ms_per_request": chain_cpu["hub_chain"]
        + chain_cpu["relay"]
        + chain_cpu["agent"],
        "hub_cpu_ms_per_request": chain_cpu["hub_chain"],
        "sshd_cpu_ms_per_request": chain_cpu["sshd"],
        "openai_hub_cpu_ms_per_request": c64["openai"]["cpu_ms"]["hub_openai"],
        "ttft_overhead_p50_ms": streaming["chain"]["ttft_p50"] - streaming["direct"]["ttft_p50"],
        "stream_tps_ratio": streaming["chain"]["tps"] / streaming["direct"]["tps"],
        "streams_1000_errors": small["errors"],
        "streams_5000_errors": large["errors"],
        "streams_sizes": [small["count"], large["count"]],
        "hub_rss_mb_5000_streams": large["hub_rss_mb"],
        "agent_rss_mb_5000_streams": large["agent_rss_mb"],
        "soak_seconds": soak["seconds"],
        "soak_rss_growth_pct": soak["rss_growth_pct"],
        "soak_errors": soak["errors"],
        "soak_fd_growth": soak["fd_growth"],
        "errors_other": seq["errors"] + c64["errors"] + streaming["errors"],
    }
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in line.items()}


def _num(value: float, digits: int = 2) -> str:
    return "-" if isinstance(value, float) and math.isnan(value) else f"{value:.{digits}f}"


def table(figures: dict[str, Any]) -> str:
    seq, c64, st = figures["sequential"], figures["c64"], figures["streaming"]
    rows = [f"{'':28s}{'direct':>12s}{'openai hub':>12s}{'chain':>12s}"]

    def row(label: str, get: Callable[[str], float], digits: int = 2) -> None:
        rows.append(f"{label:28s}" + "".join(f"{_num(get(r), digits):>12s}" for r in phases.ROUTES))

    row("sequential p50 ms", lambda r: seq[r]["p50"])
    row("sequential p99 ms", lambda r: seq[r]["p99"])
    row(f"c{c64['width']} requests/s", lambda r: c64[r]["rps"], 0)
    row(f"c{c64['width']} p50 ms", lambda r: c64[r]["p50"])
    row(f"c{c64['width']} p99 ms", lambda r: c64[r]["p99"])
    for part in ("client", "hub_openai", "hub_chain", "sshd", "relay", "agent"):

        def cpu(route: str, part: str = part) -> float:
            return float(c64[route]["cpu_ms"][part])

        row(f"  CPU ms/request {part}", cpu, 3)
    row("stream first chunk p50 ms", lambda r: st[r]["ttft_p50"])
    row(f"stream tokens/s ({st['tokens']} tok)", lambda r: st[r]["tps"], 0)
    rows.append("HTTP/1.1 client, direct:   CPU ms/req  c64 p50  c64 p99   req/s  stream tok/s")
    for name, c in figures["clients"].items():
        rows.append(
            f"  {name:24s}{c['cpu_ms']:10.3f}{c['c64_p50']:9.2f}{c['c64_p99']:9.2f}"
            f"{c['rps']:8.0f}{c['stream_tps']:14.0f}"
        )
    for size in ("small", "large"):
        s = figures[f"streams_{size}"]
        rows.append(
            f"{s['count']} long streams ({s['tokens']} s) at once via chain: errors "
            f"{s['errors']} {s['error_kinds'] or ''}, hub peak {s['hub_rss_mb']:.0f} MB, "
            f"agent peak {s['agent_rss_mb']:.0f} MB, {s['seconds']:.0f} s"
        )
    soak = figures["soak"]
    rows.append(
        f"soak {soak['seconds']:.0f} s at {soak['width']}: {soak['requests']} requests, errors "
        f"{soak['errors']}, RSS growth {soak['rss_growth_pct']:.1f}% (before/after "
        f"{soak['before']}, {soak['after']}), fd growth {soak['fd_growth']}"
    )
    return "\n".join(rows)


def _stop_on_sigterm() -> None:
    def handler(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    _stop_on_sigterm()
    files = raise_open_files()
    command = "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"{command}  (cores {os.cpu_count()}, open files {files}, load {load_average()})")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="saia-bench-") as tmp:
        chain = Chain(args.keep or Path(tmp)).start()
        try:
            with asyncio.Runner(loop_factory=new_loop()) as runner:
                figures = runner.run(measure(chain, args))
        finally:
            chain.stop()
    line = summary(figures) | {"load_average": load_average(), "command": command.strip()}
    line["minutes"] = round((time.monotonic() - started) / 60, 1)
    print(table(figures))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"summary": line, "figures": figures}, indent=1) + "\n")
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
