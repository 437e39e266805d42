"""Slurm's predicted start of a new job in each of a service's placements (`sbatch
--test-only`), asked in the observe step and put into the snapshot for the policy
(`ServiceSnapshot.placement_starts`, chosen from in `placement.py`).

Only for a service with more than one placement that may submit or move a job soon, and
at most once per `placement_probe_interval` per service: each probe is a scheduler run in
slurmctld. Each call is bounded by `slurm_timeout` (the placements of one service are
asked at once, so a probe takes at most that long); a failure leaves that prediction
unknown and is logged once per outage. Between probes the policy sees the last answers,
with the time they were observed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace

from hpc.config import ServiceConfig
from hpc.jobs.system import JobSystem, Submission
from hpc.scheduler.episode import Episode
from hpc.scheduler.placement import floor_count
from hpc.scheduler.policy import PlacementStart, ServiceSnapshot, Snapshot, desired_instances

log = logging.getLogger(__name__)

Render = Callable[[ServiceConfig], Submission]


def placed_submission(render: Render, service: ServiceConfig, placement: str) -> Submission:
    """The job of `service` rendered for one of its placements, labelled with it."""
    placed = service.placed(placement)
    res = placed.resources
    return replace(
        render(placed),
        placement=placement,
        partition=res.partition or "",
        qos=res.qos or "",
        reservation=res.reservation or "",
    )


def may_submit(service: ServiceSnapshot, now: float, horizon: float) -> bool:
    """Whether the policy may soon submit a job of the service with a choice of where:
    the load wants more instances, the floor is short, a renewal is due within
    `horizon`, or a pending job might be moved."""
    config = service.config
    if len(config.candidates) < 2:
        return False
    active = [job for job in service.jobs if not (job.cancelled or job.draining)]
    if any(not job.info.running and job.moved_from is None for job in active):
        return True
    if floor_count(service, active) < config.min_instances:
        return True
    if desired_instances(service, now) > len(active):
        return True
    soon = config.renewal_lead + horizon
    return any(job.info.time_left_s is not None and job.info.time_left_s <= soon for job in active)


class PlacementProbes:
    """The latest predictions per service; `update` asks again where it is due."""

    def __init__(self) -> None:
        self._asked: dict[str, float] = {}  # service -> when it was last probed
        self._latest: dict[str, tuple[PlacementStart, ...]] = {}
        # One outage per service: another service's good answers do not end it (logging
        # its failure again and "answers again" every interval).
        self._outages: dict[str, Episode] = {}

    async def update(
        self,
        snapshot: Snapshot,
        jobs: JobSystem,
        render: Render,
        interval: float,
        limit_s: float,
        now: float,
    ) -> Snapshot:
        """The snapshot with each service's latest predictions, asking Slurm where due."""
        services = []
        for service in snapshot.services:
            name = service.config.name
            asked = self._asked.get(name)
            if (asked is None or now - asked >= interval) and may_submit(service, now, interval):
                self._asked[name] = now
                self._latest[name] = await self._probe(service.config, jobs, render, limit_s, now)
            services.append(replace(service, placement_starts=self._latest.get(name, ())))
        names = {service.config.name for service in snapshot.services}
        self._latest = {name: got for name, got in self._latest.items() if name in names}
        self._outages = {name: got for name, got in self._outages.items() if name in names}
        return replace(snapshot, services=tuple(services))

    async def _probe(
        self, service: ServiceConfig, jobs: JobSystem, render: Render, limit_s: float, now: float
    ) -> tuple[PlacementStart, ...]:
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(self._one(service, name, jobs, render, limit_s))
                for name in (placement.name or "" for placement in service.candidates)
            ]
        answers = [task.result() for task in tasks]
        errors = [error for _start, error in answers if error]
        outage = self._outages.get(service.name)
        if outage is None:
            name = service.name.replace("%", "%%")  # the message is a %-format
            recovered = f"{name}: sbatch --test-only answers again after %.0f s"
            outage = self._outages[service.name] = Episode(log, recovered)
        if errors:
            outage.failed(now, f"{service.name}: cannot predict a start: {errors[0]}")
        else:
            outage.ok(now)
        names = [placement.name or "" for placement in service.candidates]
        return tuple(
            PlacementStart(name, start, now)
            for name, (start, _) in zip(names, answers, strict=True)
        )

    @staticmethod
    async def _one(
        service: ServiceConfig, name: str, jobs: JobSystem, render: Render, limit_s: float
    ) -> tuple[float | None, str]:
        """(predicted start, "") or (None, why not)."""
        try:
            submission = placed_submission(render, service, name)
            async with asyncio.timeout(limit_s):
                estimate = await jobs.test_start(submission)
        except Exception as error:  # unknown: the policy ranks it after the known ones
            return None, f"{name}: {error or 'timed out'}"
        return estimate.start, ""
