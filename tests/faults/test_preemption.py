"""Fault k: Slurm preempts the burst instance under steady load (issue 12).

The sandbox cluster has partition-priority preemption (saia/sandbox/slurm_conf.py): the
service's floor instance runs on `gpu` (never preempted), the instance above it on the
preemptible `burst` partition. A job the test submits to the higher-tier `urgent`
partition needs the burst job's GPU: Slurm preempts it (SIGTERM to the job's shell at
once, SIGKILL after GraceTime), the job drains and the agent submits a replacement at
once (no back-off: preemption is no failed start), which starts when the urgent job ends.
No request may fail: the floor instance and the router's queue carry the load meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from hpc.jobs.system import job_dir
from hpc.scheduler.observation import STOPPING_FILE
from hpc.scheduler.status import read_status, serving
from saia.sandbox.slurm_conf import BURST, GPUS, URGENT
from tests.faults.chain import BASE_SERVICE, COMMAND_TIMEOUT, FaultChain
from tests.faults.load import Load, LoadResult, run_load
from tests.faults.report import build_report, check_targets, wait_steady
from tests.hpc.helpers import until

T = TypeVar("T")
SERVICE = "bursting"
SERVICES = [
    {
        "name": SERVICE,
        "min_instances": 1,
        "max_instances": 2,
        "target_concurrency": 2,  # the load of 8 clients wants both instances
        "look_back": "5s",  # the burst instance goes soon after the load
        # Listed first: the load instance takes it when both would start now.
        "placements": [{"partition": BURST, "preemptible": True}, {"partition": "gpu"}],
        "resources": BASE_SERVICE["resources"],
    }
]
LOAD_LIMIT = 400.0  # the load's own bound; the test stops it once all was observed
STEP_LIMIT = 90.0  # each awaited step, on a busy 2-core machine
URGENT_S = 15.0  # how long the urgent job holds the burst GPU: the floor serves alone


async def eventually(check: Callable[[], Awaitable[T | None]], what: str) -> T:
    """Poll an async check (bounded): Slurm, status.json and /proc signal nothing."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STEP_LIMIT
    while (value := await check()) is None:
        assert loop.time() < deadline, f"{what} within {STEP_LIMIT:.0f} s"
        await asyncio.sleep(0.2)
    return value


async def ready_jobs(chain: FaultChain) -> dict[str, str]:
    """Our running jobs that the agent has in rotation: job id -> partition."""
    try:
        status = {j.job_id: serving(j) for j in read_status(chain.state_dir).jobs}
    except (OSError, ValueError):  # being replaced right now
        return {}
    jobs = await chain.jobs()
    return {j.job_id: j.partition for j in jobs if j.running and status.get(j.job_id) == "ready"}


async def slurm(chain: FaultChain, *argv: str, check: bool = True) -> str:
    """A Slurm command on the sandbox cluster; its stdout ("" when it failed unchecked)."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        env=chain.cluster.env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(COMMAND_TIMEOUT):
        out, err = await process.communicate()
    assert process.returncode == 0 or not check, f"{argv[0]} failed: {err.decode()}"
    return out.decode() if process.returncode == 0 else ""


async def submit_urgent(chain: FaultChain) -> str:
    """A job of someone else in the high tier that needs every GPU but the floor's."""
    out = await slurm(
        chain, "sbatch", "--parsable", f"--partition={URGENT}", f"--gres=gpu:{GPUS - 1}",
        "--cpus-per-task=1", "--mem=64M", "--time=10:00", f"--job-name={chain.prefix}-urgent",
        "--output=/dev/null", "--wrap", "sleep 600",
    )  # fmt: skip
    return out.strip().split(";")[0]


async def state_of(chain: FaultChain, job_id: str) -> str:
    """The job's state; "" once Slurm no longer knows it (squeue then fails)."""
    squeue = ("squeue", "--noheader", "--format=%T", f"--jobs={job_id}")
    return (await slurm(chain, *squeue, check=False)).strip()


@dataclass
class Preemption:
    """What the test saw, event-loop times of when it saw it."""

    first: dict[str, str]  # the ready jobs before: job id -> partition
    burst: str  # the job Slurm preempted
    urgent: str = ""
    urgent_at: float = 0.0  # the urgent job submitted
    signalled: float = 0.0  # the burst job's shell got SIGTERM (its stopping file)
    replacement: str = ""  # the first job submitted after it
    submitted: float = 0.0
    urgent_then: str = ""  # the urgent job's state when the replacement was seen
    urgent_ran: float = 0.0  # the urgent job running
    freed: float = 0.0  # the urgent job cancelled
    serving: str = ""  # the replacement that served (the policy may have moved it)
    ready: float = 0.0

    def line(self) -> str:
        return (
            f"  SIGTERM {self.signalled - self.urgent_at:.1f}s after the urgent job was "
            f"submitted; replacement {self.replacement} submitted "
            f"{self.submitted - self.signalled:.1f}s after the SIGTERM (urgent job "
            f"{self.urgent_then} then); {self.serving} ready {self.ready - self.freed:.1f}s "
            f"after the urgent job ended, {self.ready - self.signalled:.1f}s after the preemption"
        )


async def burst_instance(chain: FaultChain) -> Preemption:
    """Under load: the floor on gpu and the load instance on burst, both ready."""

    async def both_ready() -> dict[str, str] | None:
        jobs = await ready_jobs(chain)
        return jobs if sorted(jobs.values()) == sorted([BURST, "gpu"]) else None

    first = await eventually(both_ready, "no ready burst instance beside the floor")
    [burst] = [job for job, partition in first.items() if partition == BURST]
    return Preemption(first, burst)


async def preempt_and_replace(chain: FaultChain, seen: Preemption) -> None:
    """The urgent job preempts the burst one; it runs URGENT_S, then the replacement serves."""
    loop = asyncio.get_running_loop()
    seen.urgent, seen.urgent_at = await submit_urgent(chain), loop.time()
    marker = job_dir(chain.state_dir, seen.burst) / STOPPING_FILE
    await until(marker.exists, STEP_LIMIT, "the burst job got no SIGTERM", poll_s=0.1)
    seen.signalled = loop.time()

    async def replacement() -> str | None:
        return next((j.job_id for j in await chain.jobs() if j.job_id not in seen.first), None)

    seen.replacement = await eventually(replacement, "no replacement submitted")
    seen.submitted, seen.urgent_then = loop.time(), await state_of(chain, seen.urgent)
    await eventually(lambda: _is(state_of(chain, seen.urgent), "RUNNING"), "no urgent run")
    seen.urgent_ran = loop.time()
    await asyncio.sleep(URGENT_S)  # the urgent job's run itself, not a wait for something
    await slurm(chain, "scancel", seen.urgent)
    seen.freed = loop.time()

    async def replacement_ready() -> str | None:
        # The placement policy may move the pending replacement (cancel, submit anew)
        # to another placement while it waits: any new job serving counts.
        return next((job for job in await ready_jobs(chain) if job not in seen.first), None)

    seen.serving = await eventually(replacement_ready, "no replacement served")
    seen.ready = loop.time()


async def test_preempted_burst_instance_drains_and_is_replaced(fault_chain: FaultChain) -> None:
    chain = fault_chain
    state, back = await wait_steady(chain)
    assert back, f"the chain is not steady before the fault: {state}"
    load = Load(chain.hub_url, SERVICE, chain.keys, clients=8, duration=LOAD_LIMIT)
    result, stop = LoadResult(), asyncio.Event()
    task = asyncio.create_task(run_load(load, result, stop))
    seen: Preemption | None = None
    try:
        seen = await burst_instance(chain)
        await preempt_and_replace(chain, seen)
    finally:
        stop.set()
        await task  # every request ends within its own timeout
        if seen is not None and seen.urgent:
            await slurm(chain, "scancel", seen.urgent, check=False)
    report = await build_report(
        chain, "k. burst instance preempted (Slurm)", result, seen.signalled
    )
    check_targets(report, result, died_at=None)  # the preempted server drained: none failed
    print(seen.line())
    alone = [
        o for o in result.outcomes if seen.urgent_ran <= o.started and (o.ended or 0) <= seen.freed
    ]
    print(f"  {len(alone)} requests sent and ended while the floor served alone")
    log = (chain.root / "agent.log").read_text(errors="replace")
    for line in log.splitlines():
        if f"job {seen.burst} " in line or "submitted job" in line or "cancelling job" in line:
            print("  agent:", line[11:])
    assert f"job {seen.burst} ({SERVICE}) got its stop signal from Slurm" in log
    assert "failed start" not in log, "the preemption was counted as a failed start"
    assert alone and all(o.kind == "ok" for o in alone), result.summary()
    assert seen.burst not in {j.job_id for j in await chain.jobs()}
    assert await state_of(chain, seen.urgent) not in ("PENDING", "RUNNING"), "urgent job left"


async def _is(value: Awaitable[str], wanted: str) -> bool | None:
    return True if await value == wanted else None
