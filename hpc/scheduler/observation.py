"""The agent's observe step: Slurm's job list, the health book, the backends' own load
figures and the router's counts, turned into the `Snapshot` the pure policy decides on.

Functions over the agent's `LiveState` (`hpc/scheduler/live.py`): its methods record what
the job list says (adopted and lost jobs, starts, readiness), the endpoints the jobs wrote
and the load samples; everything else here only reads. The only files read are the ones
the jobs write (endpoint.json, api_key, and `stopping`, which slurm/common.sh writes when
the job gets its stop signal).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from hpc.config import ServiceConfig
from hpc.jobs.system import JobInfo, job_dir, read_endpoint
from hpc.registry import BackendRegistry
from hpc.scheduler.health import ProbeTarget, read_backend_key
from hpc.scheduler.live import LiveState
from hpc.scheduler.placement import placement_of
from hpc.scheduler.policy import Backoff, JobView, LoadSample, LostJob, ServiceSnapshot, Snapshot

log = logging.getLogger(__name__)
STOPPING_FILE = "stopping"  # written by slurm/common.sh's saia_stop


def observe(
    live: LiveState,
    registry: BackendRegistry,
    infos: list[JobInfo],
    now: float,
    starts: Mapping[str, float | None] | None = None,
) -> Snapshot:
    """Take in the job list (and Slurm's expected starts of the pending jobs, where known)
    and return what the policy needs to decide now."""
    starts = starts or {}
    lost = live.take_job_list(infos, now)
    lost = {name: [_not_failed(live, job) for job in jobs] for name, jobs in lost.items()}
    _read_endpoints(live, infos)
    _note_stops(live, infos)
    for service in live.services.values():
        live.add_load_sample(service, _load_sample(live, registry, service, now))
    snapshots = tuple(
        ServiceSnapshot(
            config=service,
            jobs=tuple(_view(live, registry, i, starts) for i in infos if i.service == name),
            lost=tuple(lost.get(name, ())),
            load=tuple(live.loads(name)),
            demand_since=registry.demand_since(name),
            backoff=live.backoff.get(name, Backoff()),
        )
        for name, service in live.services.items()
    )
    orphans = tuple(
        _view(live, registry, i, starts) for i in infos if i.service not in live.services
    )
    return Snapshot(
        services=snapshots,
        health_failures=live.config.health_failures,
        max_total_gpus=live.config.max_total_gpus,
        orphans=orphans,
    )


def _read_endpoints(live: LiveState, infos: list[JobInfo]) -> None:
    """A running job writes endpoint.json once it listens; read it until it has."""
    state_dir = live.config.state_dir
    for info in infos:
        if info.running and info.job_id not in live.endpoints:
            endpoint = read_endpoint(state_dir, info.job_id)
            if endpoint is not None:
                live.found_endpoint(info.job_id, endpoint, read_backend_key(state_dir, info.job_id))


def stopping(state_dir: Path, job_id: str) -> bool:
    """Whether the job's shell got its stop signal (Slurm's preemption or time limit, or
    a scancel): slurm/common.sh writes the file before it stops the server."""
    return (job_dir(state_dir, job_id) / STOPPING_FILE).exists()


def _note_stops(live: LiveState, infos: list[JobInfo]) -> None:
    """A running job that Slurm is stopping (not the agent: those are cancelled already)
    drains at once: the router sends it nothing new, and the policy replaces the instance
    now instead of after failed health checks or the job's end."""
    for info in infos:
        record = live.jobs.get(info.job_id)
        if record is None or record.cancelled or record.draining or not info.running:
            continue
        if stopping(live.config.state_dir, info.job_id):
            log.info("job %s (%s) got its stop signal from Slurm", info.job_id, info.service)
            live.start_draining(info.job_id, "stopped by Slurm (preempted or out of time)")


def _not_failed(live: LiveState, job: LostJob) -> LostJob:
    """A job that ended after Slurm stopped it (preempted while loading, say) did not fail
    to start: it counts like one the agent cancelled, with no back-off."""
    if job.was_ready or job.cancelled or not stopping(live.config.state_dir, job.job_id):
        return job
    return replace(job, cancelled=True)


def in_backends(live: LiveState, service: str) -> int:
    """Running plus waiting requests the service's live jobs last reported (/metrics)."""
    total = 0
    for job_id, record in live.jobs.items():
        if record.service != service or record.cancelled:
            continue
        load = live.health.get(job_id).load
        if load is not None:
            total += load.running + load.waiting
    return total


def _load_sample(
    live: LiveState, registry: BackendRegistry, service: ServiceConfig, now: float
) -> LoadSample:
    # The registry keeps the router's monotonic clock; the samples use the agent's.
    load = registry.load(service.name, time.monotonic())
    return LoadSample(now, load.in_flight + load.queued, in_backends(live, service.name))


def _view(
    live: LiveState, registry: BackendRegistry, info: JobInfo, starts: Mapping[str, float | None]
) -> JobView:
    record = live.jobs[info.job_id]
    health = live.health.get(info.job_id)
    service = live.services.get(info.service)
    return JobView(
        info=info,
        first_seen=record.first_seen,
        running_since=record.running_since,
        ready_since=record.ready_since,
        health_failures=health.failures,
        draining=record.draining,
        cancelled=record.cancelled,
        replaces=record.replaces,
        in_flight=registry.in_flight_of(info.service, info.job_id),
        operator_drain=record.operator_drain,
        expected_start=starts.get(info.job_id) if info.state == "PENDING" else None,
        placement=placement_of(service, info) if service is not None else None,
        moved_from=record.moved_from,
    )


def probe_targets(live: LiveState) -> list[ProbeTarget]:
    """Every job with an endpoint that is not cancelled, with its key and readiness."""
    targets = []
    for job_id, endpoint in live.endpoints.items():
        record = live.jobs.get(job_id)
        if record is None or record.cancelled or record.service not in live.services:
            continue
        targets.append(
            ProbeTarget(
                job_id=job_id,
                url=endpoint.url,
                model_id=live.services[record.service].model_id,
                api_key=live.key(job_id),
                certificate=endpoint.certificate,
                ready=live.health.get(job_id).ready_since is not None,
            )
        )
    return targets
