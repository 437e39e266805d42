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


PERMANENT_EXITS = (1, 2)  # the driver's own error or bad arguments: a rerun fails the same


@dataclass(frozen=True)
class Observed:
    """What the manager saw of a batch: its job in Slurm, the files, the record."""

    job_state: str | None  # Slurm's state while the job is listed
    exit_code: int | None  # what the job script wrote when the driver ended
    cancel_asked: bool
    answered: int  # lines in the output and errors files
    total: int
    attempts: int  # jobs submitted so far
    deadline: float  # epoch seconds: the end of the completion window


@dataclass(frozen=True)
class BatchState:
    state: str  # queued | running | completed | failed | cancelled
    message: str | None = None
    resubmit: bool = False  # submit a job for the requests left (the state says queued)


def batch_state(seen: Observed, config: BatchConfig, now: float) -> BatchState:
    """The batch's state from its job and files, and whether a new job should carry on
    where an ended one stopped (time limit, preemption, node failure: requests left, time
    left before the deadline for a job to load the model, attempts left)."""
    if seen.exit_code == 0 or (seen.job_state is None and seen.answered >= seen.total):
        return BatchState("completed")
    if seen.job_state is not None:
        return BatchState("queued" if seen.job_state == "PENDING" else "running")
    if seen.cancel_asked:
        return BatchState("cancelled")
    ended = (
        "the batch job ended without a result (time limit, deadline, node failure or "
        "cancelled outside saia)"
        if seen.exit_code is None
        else f"the batch job's runner exited with status {seen.exit_code}"
    )
    if seen.exit_code in PERMANENT_EXITS:
        return BatchState("failed", ended)
    if seen.attempts >= config.max_attempts:
        return BatchState("failed", f"{ended}; {seen.attempts} jobs ran, the last allowed")
    if seen.deadline - now <= config.load_time:
        if now < seen.deadline:  # the hub expires it at the window's end, partial output kept
            return BatchState("running", f"{ended}; too little time for another job")
        return BatchState("failed", f"{ended}; the completion window has passed")
    left = seen.total - seen.answered
    return BatchState("queued", f"{ended}; resubmitted for {left} requests left", True)
