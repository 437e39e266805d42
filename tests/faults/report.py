"""The report of one fault test, and the targets every fault test asserts.

`await build_report(chain, name, result, fault_at)` waits (bounded) until the chain is back
to its steady state (each service: `min_instances` running jobs, listed ready by the hub,
no process of a job that is gone), then counts what leaked and compares the hub's usage
table with the requests the load generator saw succeed. `report.line()` is what the test
prints; `check_targets(report, result, died_at)` asserts the targets.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from tests.faults.chain import FaultChain
from tests.faults.load import LoadResult, Outcome

SETTLE_LIMIT = 120.0  # a replacement job under load on a busy 2-core machine
USAGE_LIMIT = 15.0  # usage rows are written off the request path, a little later
POLL = 0.25


@dataclass
class FaultReport:
    name: str
    sent: int
    ok: int
    before_first_byte: int
    mid_stream: int
    hung: int
    processes_leaked: int
    jobs_left: int
    usage_lost: int
    usage_doubled: int
    back_after_s: float | None  # from the fault until all was back; None: not within limit
    unsettled: str = ""  # what was not back, if anything

    def line(self) -> str:
        back = "never" if self.back_after_s is None else f"{self.back_after_s:.1f}s"
        return (
            f"FAULT {self.name}: sent={self.sent} ok={self.ok} "
            f"failed_before_first_byte={self.before_first_byte} "
            f"failed_mid_stream={self.mid_stream} hung={self.hung} "
            f"processes_leaked={self.processes_leaked} jobs_left={self.jobs_left} "
            f"usage_lost={self.usage_lost} usage_doubled={self.usage_doubled} "
            f"back_after={back}{' (' + self.unsettled + ')' if self.unsettled else ''}"
        )


@dataclass
class Steady:
    """What differs from the steady state (all zero and empty: back)."""

    leaked_pids: list[int]
    extra_jobs: int
    problems: list[str]

    @property
    def back(self) -> bool:
        return not (self.leaked_pids or self.extra_jobs or self.problems)


async def steady_state(chain: FaultChain) -> Steady:
    jobs = await chain.jobs()
    running = {j.job_id for j in jobs if j.state == "RUNNING"}
    processes = chain.job_processes()
    leaked = [pid for job, pids in processes.items() if job not in running for pid in pids]
    problems, extra = [], 0
    for service in chain.services:
        name, wanted = str(service["name"]), int(service["min_instances"])
        mine = [j for j in jobs if j.service == name]
        extra += max(0, len(mine) - wanted)
        if len([j for j in mine if j.job_id in running]) != wanted:
            problems.append(f"{name}: jobs {[(j.job_id, j.state) for j in mine]}")
        if any(not chain.server_pids(j.job_id) for j in mine if j.job_id in running):
            problems.append(f"{name}: a running job has no server")
        if (status := await chain.model_status(name)) != "ready":
            problems.append(f"{name}: {status}")
    return Steady(leaked, extra, problems)


async def wait_steady(chain: FaultChain, limit: float = SETTLE_LIMIT) -> tuple[Steady, bool]:
    """Poll (bounded) until the chain is back; the last state seen and whether it is."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not (state := await steady_state(chain)).back and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(POLL)  # Slurm, /proc and the hub signal nothing: poll
    return state, state.back


async def usage_check(chain: FaultChain, result: LoadResult) -> tuple[int, int]:
    """(lost, doubled): ok requests without exactly one usage row, polled until complete."""
    ok_ids = [o.request_id or "" for o in result.of("ok")]
    sent_ids = [o.request_id for o in result.outcomes if o.request_id]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + USAGE_LIMIT
    while True:
        rows = await chain.usage_rows(sent_ids)
        lost = sum(1 for request_id in ok_ids if not rows.get(request_id))
        doubled = sum(1 for count in rows.values() if count > 1)
        if lost == 0 or loop.time() >= deadline:
            return lost, doubled
        await asyncio.sleep(POLL)


async def build_report(
    chain: FaultChain, name: str, result: LoadResult, fault_at: float | None
) -> FaultReport:
    """After the load ended: wait until all is back, count leaks and usage, print the line.

    `fault_at` (event-loop time of the injection) starts the back_after clock; None: the
    load's start (a fault the test does not time, e.g. a renewal)."""
    loop = asyncio.get_running_loop()
    start = fault_at if fault_at is not None else min(o.started for o in result.outcomes)
    state, back = await wait_steady(chain)
    back_after = loop.time() - start if back else None
    lost, doubled = await usage_check(chain, result)
    report = FaultReport(
        name=name,
        sent=len(result.outcomes),
        ok=result.count("ok"),
        before_first_byte=result.count("before_first_byte"),
        mid_stream=result.count("mid_stream"),
        hung=result.count("hung"),
        processes_leaked=len(state.leaked_pids),
        jobs_left=state.extra_jobs,
        usage_lost=lost,
        usage_doubled=doubled,
        back_after_s=back_after,
        unsettled="; ".join(state.problems),
    )
    print(report.line())
    return report


def in_flight_at(outcome: Outcome, moment: float) -> bool:
    """A stream whose answer had started (200 head) and had not ended at `moment`."""
    answered, ended = outcome.answered, outcome.ended
    return outcome.stream and answered is not None and answered <= moment <= (ended or moment)


def check_targets(report: FaultReport, result: LoadResult, died_at: float | None) -> None:
    """The targets of every fault test. `died_at`: when a backend died (None: none did);
    only streams in flight at that moment may fail mid-stream."""
    assert report.sent > 0 and report.ok > 0, report.line()
    assert report.before_first_byte == 0, f"{report.line()}: {result.summary()}"
    assert report.hung == 0, f"{report.line()}: {result.summary()}"
    stray = [o for o in result.of("mid_stream") if died_at is None or not in_flight_at(o, died_at)]
    assert not stray, f"{report.line()}: streams failed that were not on the dead backend {stray}"
    assert report.processes_leaked == 0, report.line()
    assert report.jobs_left == 0, report.line()
    assert report.back_after_s is not None, report.line()
    assert (report.usage_lost, report.usage_doubled) == (0, 0), report.line()
