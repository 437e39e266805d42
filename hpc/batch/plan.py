"""Pure decisions about batch jobs: what to ask Slurm for, and what state a batch is in.

No clocks, files or Slurm here: the manager passes what it observed and `now`.

Why every batch is its own job (and not sent through a service's running backends): the
backends are sized for interactive load, and a batch there would hold their slots for
minutes to hours; Slurm already has the account, fair share, QOS and backfill a batch
needs. A batch could instead go through the backends only when it is small (at most a few
dozen requests), its service has ready backends with idle slots right now, and the router
can give it a lower priority than interactive requests (vLLM's `--scheduling-policy
priority`); until the router has that batch class, every batch runs as a job.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from hpc.config import BatchConfig, ServiceConfig

BATCH_ID = re.compile(r"^batch-[A-Za-z0-9]{1,40}$")
PROGRESS = re.compile(rb"Running batch:\s*\d+% Completed \| (\d+)/(\d+)")
MARGIN = 1.5  # the estimate is a guess: a job cut by its limit loses the batch


@dataclass(frozen=True)
class JobPlan:
    time_limit_s: int
    deadline: float  # epoch seconds: Slurm's --deadline (a job not done by then is stopped)
    account: str | None
    qos: str | None
    nice: int


def plan_job(
    requests: int,
    window_s: float,
    user: str | None,
    group: str | None,
    service: ServiceConfig,
    config: BatchConfig,
    now: float,
) -> JobPlan:
    """The job's --time from the input size, --deadline from the completion window, and the
    account and QOS the user's (else the group's) entry names."""
    rounds = math.ceil(requests / config.parallel)
    estimate = (config.load_time + rounds * config.seconds_per_request) * MARGIN
    limit = min(max(estimate, config.min_time), config.max_time, max(window_s, 60.0))
    entry = None
    for name in (f"user:{user}" if user else None, f"group:{group}" if group else None):
        if name is not None and name in config.accounts:
            entry = config.accounts[name]
            break
    account = (entry.account if entry else None) or service.resources.account
    qos = (entry.qos if entry else None) or config.qos
    return JobPlan(int(limit), now + window_s, account, qos, config.nice)


@dataclass(frozen=True)
class BatchState:
    state: str  # queued | running | completed | failed | cancelled
    message: str | None = None


def batch_state(job_state: str | None, exit_code: int | None, cancel_asked: bool) -> BatchState:
    """The batch's state from its job: Slurm's state while listed, the exit code the job
    script wrote when it ended, and whether a cancel was asked."""
    if exit_code is not None:
        if exit_code == 0:
            return BatchState("completed")
        if cancel_asked:
            return BatchState("cancelled")
        return BatchState("failed", f"the batch job's runner exited with status {exit_code}")
    if job_state is not None:
        return BatchState("queued" if job_state == "PENDING" else "running")
    if cancel_asked:
        return BatchState("cancelled")
    return BatchState("failed", "the batch job ended without a result (time limit, deadline, "
                      "node failure or cancelled outside saia)")  # fmt: skip


def progress(log_tail: bytes, output_lines: int) -> int:
    """Requests done: the runner's last progress line (vLLM prints it), or the lines of
    output written so far (the stand-in writes as it goes), whichever is more."""
    found = PROGRESS.findall(log_tail)
    reported = int(found[-1][0]) if found else 0
    return max(reported, output_lines)
