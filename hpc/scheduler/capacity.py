"""Slurm-aware capacity: when a cold service will have an instance, from what Slurm says.

Pure: a `ServiceSnapshot` and `now` in, seconds out. The router can answer a request it
cannot place with this as Retry-After instead of a bare 503 (the wiring of Slurm's
`squeue --start` estimates into the snapshot, `JobView.expected_start`, is still to come).
"""

from __future__ import annotations

from hpc.scheduler.policy import JobView, ServiceSnapshot


def ready_estimate(job: JobView, now: float, load_time: float) -> float | None:
    """When this job should serve: now if ready; start + load time if running; Slurm's
    expected start + load time if pending with an estimate; None when nobody knows."""
    if job.draining or job.cancelled:
        return None
    if job.ready:
        return now
    start = job.running_since if job.running_since is not None else job.expected_start
    if start is None:
        return None
    return max(now, start + load_time)


def predicted_wait(service: ServiceSnapshot, now: float, load_time: float) -> float | None:
    """Seconds until the service's first instance can take a request (0 when one can);
    None when no job has an estimate (nothing submitted, or Slurm has not planned it)."""
    estimates = [ready_estimate(job, now, load_time) for job in service.jobs]
    known = [at for at in estimates if at is not None]
    return min(known) - now if known else None
