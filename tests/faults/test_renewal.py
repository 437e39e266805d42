"""Fault i: renewals at the job time limit under steady load (issue 9).

The service's jobs have a one-minute Slurm time limit and a renewal lead of 45 s, so each
job is renewed about 15 s after it started: the agent submits the replacement, drains the
old job once the replacement is ready and cancels it when idle. Under steady load through
the whole chain, no request may fail across several renewals.
"""

from __future__ import annotations

import asyncio

from tests.faults.chain import BASE_SERVICE, FaultChain
from tests.faults.load import LoadResult, run_load
from tests.faults.report import build_report, check_targets, wait_steady

SERVICES = [
    {
        "name": "renewing",
        "resources": BASE_SERVICE["resources"] | {"time_limit": "1:00"},  # Slurm's minimum
        "renewal_lead": "45s",
    }
]
LOAD_S = 40.0  # two renewals or more


async def watch_jobs(chain: FaultChain, seen: set[str], stop: asyncio.Event) -> None:
    """Every job id that ran during the load (Slurm has no event to wait on: poll)."""
    while not stop.is_set():
        seen.update(await chain.running_jobs("renewing"))
        await asyncio.sleep(0.5)


async def test_renewals_under_steady_load_fail_no_request(fault_chain: FaultChain) -> None:
    state, back = await wait_steady(fault_chain)
    assert back, state
    first = set(await fault_chain.running_jobs("renewing"))
    load = fault_chain.load("renewing", clients=6, duration=LOAD_S)
    seen: set[str] = set()
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as group:
        watcher = group.create_task(watch_jobs(fault_chain, seen, stop))
        result: LoadResult = await run_load(load)
        stop.set()
        await watcher
    report = await build_report(fault_chain, "i. renewals under steady load", result, None)
    check_targets(report, result, died_at=None)
    renewals = len(seen - first)
    print(f"  jobs that served during the load: {sorted(seen, key=int)} ({renewals} renewals)")
    assert renewals >= 1, f"no renewal happened during the load: {sorted(seen)}"
    assert not first & set(await fault_chain.running_jobs("renewing")), "never renewed"
