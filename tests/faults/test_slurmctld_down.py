"""Fault e: slurmctld down (stopped by its pid) for OUTAGE_S seconds under load (issue 9).

The running job keeps serving: the agent's squeue calls fail meanwhile, which it logs
once (and once more when Slurm answers again) and shows in status, without leaving its
loop; afterwards it catches up with the same job (no second one). The agent retries
every loop whatever the outage's length, so a 20 s outage shows what a 60 s one would.
"""

from __future__ import annotations

import asyncio

from hpc.scheduler.status import read_status
from tests.faults.chain import FaultChain
from tests.faults.load import loaded
from tests.faults.report import build_report, check_targets, wait_steady
from tests.hpc.helpers import until

OUTAGE_S = 20.0
CATCH_UP_LIMIT = 90.0


def status_error(chain: FaultChain) -> str | None:
    try:
        return read_status(chain.state_dir).error
    except Exception:  # being replaced right now
        return None


async def slurm_answers(chain: FaultChain) -> bool:
    try:
        await chain.jobs()
    except Exception:
        return False
    return True


async def test_slurmctld_down_the_job_serves_on(fault_chain: FaultChain) -> None:
    state, back = await wait_steady(fault_chain)
    assert back, f"the chain is not steady before the fault: {state}"
    (job,) = await fault_chain.running_jobs("faulty")
    log = fault_chain.root / "agent.log"
    logged = log.read_text(errors="replace").count("cannot list jobs")
    cluster, loop = fault_chain.cluster, asyncio.get_running_loop()
    load = fault_chain.load("faulty", clients=6, duration=OUTAGE_S + 8)
    async with loaded(load) as result:
        await until(lambda: len(result.pending(answered=True)) >= 2, 30, "no load in flight")
        cluster.stop_controller()
        try:
            await until(
                lambda: "cannot list jobs" in (status_error(fault_chain) or ""), 60, "no error"
            )
            print(f"  status during the outage: {status_error(fault_chain)}")
            await asyncio.sleep(OUTAGE_S)  # the outage itself, not a wait for something
            assert fault_chain.processes["agent"].poll() is None, "the agent died"
        finally:
            cluster.start_controller(wait=False)
        back_at = loop.time()
        while not await slurm_answers(fault_chain):
            assert loop.time() - back_at < CATCH_UP_LIMIT, "slurmctld did not come back"
            await asyncio.sleep(0.5)
        await until(lambda: status_error(fault_chain) == "", CATCH_UP_LIMIT, "no catching up")
        print(f"  the agent caught up {loop.time() - back_at:.1f}s after slurmctld restarted")
    report = await build_report(
        fault_chain, f"e. slurmctld down {OUTAGE_S:.0f}s", result, fault_at=back_at
    )
    check_targets(report, result, died_at=None)  # no backend died: no stream may fail
    text = log.read_text(errors="replace")
    assert text.count("cannot list jobs") - logged == 1, "one log line per outage"
    assert "Slurm answers again after" in text
    assert await fault_chain.running_jobs("faulty") == [job]
