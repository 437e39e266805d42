"""An in-memory `JobSystem` (hpc/jobs/system.py) for fast tests of the agent loop.

It stands beside, not instead of, the real ones (`SlurmJobSystem` against the sandbox
cluster, `LocalJobSystem`): jobs are entries in a dict and time is the test's clock, so a
test plays Slurm's part by hand (a job starts, ends, vanishes; a command fails) and the
agent's loop runs in milliseconds.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from hpc.jobs.system import JobInfo, StartEstimate, Submission, job_dir, write_atomic


@dataclass
class FakeJob:
    service: str
    submitted_at: float
    time_limit_s: int
    state: str = "PENDING"
    started_at: float | None = None
    reason: str = "Resources"
    partition: str = ""
    qos: str = ""
    reservation: str = ""


class MemoryJobSystem:
    """Our jobs in a dict; `fail_*` set to an exception makes that call raise it."""

    def __init__(self, clock: Callable[[], float], time_limit_s: int = 3600) -> None:
        self.clock, self.time_limit_s = clock, time_limit_s
        self.jobs: dict[str, FakeJob] = {}
        self.submissions: list[Submission] = []
        self.cancelled: list[str] = []
        self.fail_submit: Exception | None = None
        self.fail_list: Exception | None = None
        self.fail_cancel: Exception | None = None
        self.fail_starts: Exception | None = None
        self.starts: dict[str, float | None] = {}  # Slurm's estimates, set by the test
        self.start_queries: list[list[str]] = []
        # sbatch --test-only per placement name (Submission.placement), set by the test;
        # a placement without an answer (or None) fails as Slurm's "no estimate" would
        self.placement_starts: dict[str, float | None] = {}
        self.start_tests: list[str] = []  # placement names asked, in order
        self.fail_test_start: Exception | None = None
        self.closed = False
        self._ids = itertools.count(1001)

    # -- the JobSystem interface ----------------------------------------------------
    async def submit(self, submission: Submission) -> str:
        if self.fail_submit is not None:
            raise self.fail_submit
        job_id = str(next(self._ids))
        self.jobs[job_id] = FakeJob(
            submission.service,
            self.clock(),
            self.time_limit_s,
            partition=submission.partition,
            qos=submission.qos,
            reservation=submission.reservation,
        )
        self.submissions.append(submission)
        return job_id

    async def list_jobs(self) -> list[JobInfo]:
        if self.fail_list is not None:
            raise self.fail_list
        return [self.info(job_id) for job_id in self.jobs]

    async def cancel(self, job_id: str) -> None:
        if self.fail_cancel is not None:
            raise self.fail_cancel
        self.cancelled.append(job_id)
        self.jobs.pop(job_id, None)  # gone at once: Slurm's COMPLETING is not modelled

    async def expected_starts(self, job_ids: Sequence[str]) -> dict[str, float | None]:
        self.start_queries.append(list(job_ids))
        if self.fail_starts is not None:
            raise self.fail_starts
        pending = [i for i in job_ids if i in self.jobs and self.jobs[i].state == "PENDING"]
        return {job_id: self.starts.get(job_id) for job_id in pending}

    async def test_start(self, submission: Submission) -> StartEstimate:
        self.start_tests.append(submission.placement)
        if self.fail_test_start is not None:
            raise self.fail_test_start
        start = self.placement_starts.get(submission.placement)
        if start is None:
            raise RuntimeError("sbatch: sbatch --test-only printed no start estimate")
        return StartEstimate(start, ("node1",), submission.partition)

    async def aclose(self) -> None:
        self.closed = True

    # -- playing Slurm ----------------------------------------------------------------
    def info(self, job_id: str) -> JobInfo:
        job, now = self.jobs[job_id], self.clock()
        left = None
        if job.started_at is not None:
            left = max(0, int(job.time_limit_s - (now - job.started_at)))
        return JobInfo(
            job_id=job_id,
            service=job.service,
            state=job.state,
            time_limit_s=job.time_limit_s,
            time_left_s=left,
            start_time=job.started_at,
            submit_time=job.submitted_at,
            nodes=("node1",) if job.state == "RUNNING" else (),
            reason="None" if job.state == "RUNNING" else job.reason,
            partition=job.partition,
            qos=job.qos,
            reservation=job.reservation,
        )

    def add(self, job_id: str, service: str, running: bool = False) -> None:
        """A job already in the queue (submitted by an earlier agent with our tag)."""
        now = self.clock()
        job = FakeJob(service, now, self.time_limit_s)
        self.jobs[job_id] = replace(job, state="RUNNING", started_at=now) if running else job

    def start(self, job_id: str, state_dir: Path, port: int = 8000) -> None:
        """The job runs and its server writes endpoint.json, as `slurm/common.sh` does."""
        job = self.jobs[job_id]
        job.state, job.started_at = "RUNNING", self.clock()
        endpoint = json.dumps({"host": "127.0.0.1", "port": port})
        write_atomic(job_dir(state_dir, job_id) / "endpoint.json", endpoint)  # mode 0600

    def end(self, job_id: str) -> None:
        """The job is gone from the queue (finished, killed, out of time)."""
        del self.jobs[job_id]

    def live(self, service: str) -> list[str]:
        return [job_id for job_id, job in self.jobs.items() if job.service == service]
