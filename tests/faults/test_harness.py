"""The harness itself: steady load through the unharmed chain meets every target."""

from __future__ import annotations

from tests.faults.chain import FaultChain
from tests.faults.load import run_load
from tests.faults.report import build_report, check_targets


async def test_steady_load_without_a_fault_meets_the_targets(fault_chain: FaultChain) -> None:
    load = fault_chain.load("faulty", clients=6, requests=60)
    result = await run_load(load)
    report = await build_report(fault_chain, "none (steady load)", result, fault_at=None)
    check_targets(report, result, died_at=None)
    assert report.ok == 60
    assert {o.user for o in result.outcomes} == {0, 1, 2}
    assert {o.stream for o in result.outcomes} == {True, False}
