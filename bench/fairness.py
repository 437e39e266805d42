"""Fair queueing vs FIFO under one heavy user (issue 11), on the real chain.

    .venv/bin/python -m bench.fairness [--heavy 64] [--light 4] [--rounds 10]
                                   [--running 4] [--token-delay 0.02] [--tokens 10]

Starts a sandbox Slurm cluster and the fault suite's chain (hub -> sshd -> relay -> agent ->
stand-in jobs, `tests/faults/chain.py`) with two services on the same stand-in: `fair`
(fair queueing across users) and `fifo` (arrival order). Then, in one run: the light users
alone, then with the heavy user's streams on FIFO, then on fair. Prints the light users'
p50/p95 time to first token and the heavy user's tokens/s. Asserts nothing; every process
is stopped by pid at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from pathlib import Path

from saia.sandbox.slurm import SlurmSandbox
from tests.faults.chain import FaultChain
from tests.faults.fairness_load import Scenario, describe, run_scenario


def services(args: argparse.Namespace) -> list[dict[str, object]]:
    standin = {
        "target_concurrency": args.running,
        "server_args": ["--max-running", str(args.running), "--token-delay", str(args.token_delay)],
    }
    return [{"name": "fair", **standin}, {"name": "fifo", "queueing": "fifo", **standin}]


async def measure(chain: FaultChain, args: argparse.Namespace) -> None:
    heavy, *light = chain.keys

    def scenario(model: str) -> Scenario:
        return Scenario(
            chain.hub_url, model, heavy, light, args.heavy, args.rounds, max_tokens=args.tokens
        )

    alone = await run_scenario(scenario("fair"), heavy=False)
    fifo = await run_scenario(scenario("fifo"))
    fair = await run_scenario(scenario("fair"))
    print(
        f"stand-in: {args.running} running, {args.token_delay * 1000:.0f} ms/token, "
        f"{args.tokens} tokens; heavy user {args.heavy} streams, {args.light} light users"
    )
    for name, figures in (("light alone", alone), ("FIFO", fifo), ("fair", fair)):
        print(describe(name, figures))
    if fair.median > 0:
        print(f"light TTFT p50, FIFO / fair: {fifo.median / fair.median:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heavy", type=int, default=64, help="the heavy user's streams")
    parser.add_argument("--light", type=int, default=4, help="light users (one stream each)")
    parser.add_argument("--rounds", type=int, default=10, help="requests per light user")
    parser.add_argument("--running", type=int, default=4, help="the stand-in's --max-running")
    parser.add_argument("--token-delay", type=float, default=0.02)
    parser.add_argument("--tokens", type=int, default=10, help="max_tokens per request")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="saia-fair-") as root:
        cluster = SlurmSandbox(cpus=max(8, os.cpu_count() or 1))
        cluster.start()
        try:
            chain = FaultChain(Path(root), cluster, services(args), keys=1 + args.light)
            chain.start()
            try:
                asyncio.run(measure(chain, args))
            finally:
                left = chain.stop()
                if left:
                    print(f"left behind (removed): {left}")
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
