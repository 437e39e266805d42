"""Slurm-aware capacity: when a cold service will have an instance, from what Slurm says.

Pure: a `ServiceSnapshot` and `now` in, seconds out. The agent reads Slurm's `squeue
--start` estimates into the snapshot (`JobView.expected_start`) and publishes the predicted
wait per service; the router answers a request it could not place with it as Retry-After
and lists it in /v1/models.
"""

from __future__ import annotations

from hpc.scheduler.snapshot import JobView, ServiceSnapshot


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


# Model load time assumed until one of the service's jobs has shown its own (vLLM loading
# a mid-sized model from a parallel file system).
DEFAULT_LOAD_TIME = 180.0


def load_time(service: ServiceSnapshot) -> float:
    """The longest start-to-ready time of the service's jobs in view, else the default."""
    seen = [
        job.ready_since - job.running_since
        for job in service.jobs
        if job.ready_since is not None and job.running_since is not None
    ]
    return max(seen, default=DEFAULT_LOAD_TIME)


def queued_behind(service: ServiceSnapshot, now: float) -> bool:
    """True when Slurm expects a pending job of the service to start only after its
    startup_timeout: the cluster has no room soon, and a further job of the same shape
    would queue behind it instead of serving sooner (so a burst submits no flood)."""
    horizon = now + service.config.startup_timeout
    return any(
        job.expected_start is not None and job.expected_start > horizon
        for job in service.jobs
        if not job.info.running and not job.cancelled
    )
