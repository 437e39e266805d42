"""The agent's observe step: Slurm's job list, the health book, the backends' own load
figures and the router's counts, turned into the `Snapshot` the pure policy decides on.

Functions of the `Agent` (like `hpc/scheduler/status.py`): they update its bookkeeping (adopted and
lost jobs, endpoints, keys, load history) and read nothing but files the jobs write.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from hpc.config import ServiceConfig
from hpc.jobs.system import JobInfo, read_endpoint
from hpc.scheduler.health import read_backend_key
from hpc.scheduler.policy import Backoff, JobView, LoadSample, LostJob, ServiceSnapshot, Snapshot
from hpc.scheduler.state import JobRecord

if TYPE_CHECKING:
    from hpc.scheduler.agent import Agent

log = logging.getLogger(__name__)


def observe(agent: Agent, infos: list[JobInfo], now: float) -> Snapshot:
    """Take in the job list and return what the policy needs to decide now."""
    agent.infos = {info.job_id: info for info in infos}
    lost = _drop_lost(agent)
    for info in infos:
        _track(agent, info, now)
    for service in agent.services.values():
        _sample_load(agent, service, now)
    snapshots = tuple(
        ServiceSnapshot(
            config=service,
            jobs=tuple(_view(agent, i) for i in infos if i.service == name),
            lost=tuple(lost.get(name, ())),
            load=tuple(agent.loads[name]),
            demand_since=agent.registry.demand_since(name),
            backoff=agent.state.backoff.get(name, Backoff()),
        )
        for name, service in agent.services.items()
    )
    orphans = tuple(_view(agent, i) for i in infos if i.service not in agent.services)
    return Snapshot(
        services=snapshots,
        health_failures=agent.config.health_failures,
        max_total_gpus=agent.config.max_total_gpus,
        orphans=orphans,
    )


def _drop_lost(agent: Agent) -> dict[str, list[LostJob]]:
    lost: dict[str, list[LostJob]] = {}
    for job_id in [j for j in agent.state.jobs if j not in agent.infos]:
        record = agent.state.jobs.pop(job_id)
        was_ready = record.ready_since is not None
        lost.setdefault(record.service, []).append(
            LostJob(job_id, was_ready=was_ready, cancelled=record.cancelled)
        )
        agent.health.forget(job_id)
        agent.endpoints.pop(job_id, None)
        agent.keys.pop(job_id, None)
        agent.forget_warnings(job_id)
        log.info("job %s (%s) is gone from Slurm", job_id, record.service)
    for record in agent.state.jobs.values():
        if record.replaces is not None and record.replaces not in agent.state.jobs:
            record.replaces = None
    return lost


def _track(agent: Agent, info: JobInfo, now: float) -> None:
    record = agent.state.jobs.get(info.job_id)
    if record is None:
        first_seen = info.submit_time or now
        record = agent.state.jobs[info.job_id] = JobRecord(info.service, first_seen)
        log.info("adopted job %s (%s, %s)", info.job_id, info.service, info.state)
    if info.running and record.running_since is None:
        record.running_since = min(info.start_time or now, now)
    if info.running and info.job_id not in agent.endpoints:
        endpoint = read_endpoint(agent.config.state_dir, info.job_id)
        if endpoint is not None:
            agent.endpoints[info.job_id] = endpoint
            agent.keys[info.job_id] = read_backend_key(agent.config.state_dir, info.job_id)
    ready_since = agent.health.get(info.job_id).ready_since
    if record.ready_since is None and ready_since is not None:
        record.ready_since = ready_since


def in_backends(agent: Agent, service: str) -> int:
    """Running plus waiting requests the service's live jobs last reported (/metrics)."""
    total = 0
    for job_id, record in agent.state.jobs.items():
        if record.service != service or record.cancelled:
            continue
        load = agent.health.get(job_id).load
        if load is not None:
            total += load.running + load.waiting
    return total


def _sample_load(agent: Agent, service: ServiceConfig, now: float) -> None:
    # The registry keeps the router's monotonic clock; the samples use the agent's.
    load = agent.registry.load(service.name, time.monotonic())
    history = agent.loads[service.name]
    routed = load.in_flight + load.queued
    history.append(LoadSample(now, routed, in_backends(agent, service.name)))
    window = service.look_back + service.scale_down_delay
    while history and history[0].at < now - window:
        history.popleft()


def _view(agent: Agent, info: JobInfo) -> JobView:
    record = agent.state.jobs[info.job_id]
    health = agent.health.get(info.job_id)
    return JobView(
        info=info,
        first_seen=record.first_seen,
        running_since=record.running_since,
        ready_since=record.ready_since,
        health_failures=health.failures,
        draining=record.draining,
        cancelled=record.cancelled,
        replaces=record.replaces,
        in_flight=agent.registry.in_flight_of(info.service, info.job_id),
        operator_drain=record.operator_drain,
    )
