"""Faults of the only backend of a service, under load through the whole chain (issue 9).

a. its model server SIGKILLed while streams are answered, and while requests wait in it;
b. its job cancelled (scancel) or preempted (Slurm's SIGTERM to all its processes).

In each case the agent replaces the job; requests that find no backend, or whose backend
died before answering, wait for the replacement (router queue_timeout) and are answered
there. Only streams whose own backend died may fail, and only mid-stream.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.faults.chain import FaultChain
from tests.faults.load import LoadResult, Outcome, loaded, streams_started
from tests.faults.report import build_report, check_targets, wait_steady
from tests.hpc.helpers import until

SERVICES = [
    {"name": "faulty"},  # streams of 16 tokens take about 0.8 s
    # Two requests run at a time, the others wait inside the server for a slot.
    {"name": "queueing", "server_args": ["--token-delay", "0.05", "--max-running", "2"]},
]
LOAD_S = 12.0  # the fault comes early; the replacement needs a few seconds of it


async def only_job(chain: FaultChain, service: str) -> str:
    state, back = await wait_steady(chain)
    assert back, f"the chain is not steady before the fault: {state}"
    (job,) = await chain.running_jobs(service)
    return job


def spanning(result: LoadResult, moment: float) -> list[Outcome]:
    """Requests started before `moment` that had not ended by then."""
    return [o for o in result.outcomes if o.started <= moment <= (o.ended or moment)]


def after(result: LoadResult, moment: float) -> list[Outcome]:
    return [o for o in result.outcomes if o.started > moment]


def longest_wait(outcomes: list[Outcome]) -> float:
    return max((o.answered or o.started) - o.started for o in outcomes)


async def test_backend_killed_mid_stream(fault_chain: FaultChain) -> None:
    job = await only_job(fault_chain, "faulty")
    load = fault_chain.load("faulty", clients=8, duration=LOAD_S)
    loop = asyncio.get_running_loop()
    async with loaded(load) as result:
        await streams_started(result)
        fault_chain.kill_server(job)
        died_at = loop.time()
    report = await build_report(fault_chain, "a. backend SIGKILLed mid-stream", result, died_at)
    check_targets(report, result, died_at)
    assert report.mid_stream >= 1, "the kill broke no stream: it did not hit"
    sent_after = after(result, died_at)
    assert sent_after, "no request was sent while the backend was replaced"
    assert await fault_chain.running_jobs("faulty") != [job]
    print(f"  longest wait of a request sent after the kill: {longest_wait(sent_after):.1f}s")


async def test_backend_killed_while_requests_wait_in_it(fault_chain: FaultChain) -> None:
    job = await only_job(fault_chain, "queueing")
    load = fault_chain.load(
        "queueing", clients=10, duration=LOAD_S,
        stream_every=0,
    )  # fmt: skip
    loop = asyncio.get_running_loop()
    async with loaded(load) as result:
        await until(lambda: len(result.pending(answered=False)) >= 6, 30, "too few requests wait")
        fault_chain.kill_server(job)
        died_at = loop.time()
    report = await build_report(
        fault_chain, "a. backend SIGKILLed while requests wait in it", result, died_at
    )
    check_targets(report, result, died_at)
    held = spanning(result, died_at)
    assert len(held) >= 6 and all(o.kind == "ok" for o in held), held  # retried, answered
    assert await fault_chain.running_jobs("queueing") != [job]


@pytest.mark.parametrize("how", ["cancelled", "preempted"])
async def test_only_backend_replaced_requests_wait(fault_chain: FaultChain, how: str) -> None:
    job = await only_job(fault_chain, "faulty")
    load = fault_chain.load("faulty", clients=8, duration=LOAD_S)
    loop = asyncio.get_running_loop()
    fault = fault_chain.scancel if how == "cancelled" else fault_chain.preempt
    async with loaded(load) as result:
        await until(lambda: len(result.pending(answered=True)) >= 2, 30, "no load in flight")
        died_at = loop.time()
        await fault(job)
    report = await build_report(fault_chain, f"b. only backend {how}", result, died_at)
    check_targets(report, result, died_at)
    sent_after = after(result, died_at)
    assert sent_after, "no request was sent while the backend was replaced"
    assert await fault_chain.running_jobs("faulty") != [job]
    print(f"  longest wait of a request sent after the fault: {longest_wait(sent_after):.1f}s")
