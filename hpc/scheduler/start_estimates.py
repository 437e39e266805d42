"""Slurm's expected start of the agent's pending jobs (`squeue --start`), read once per
poll in the observe step.

The estimates only sharpen decisions and the predicted wait a client is told: when the
call fails or is slow, the loop goes on with them unknown (None), and the failure is
logged once per outage, not on every loop. From them and the jobs' state, each service's
predicted wait for its first instance goes to the router (`publish_waits`).
"""

from __future__ import annotations

import asyncio
import logging
import time

from hpc.jobs.system import JobInfo, JobSystem
from hpc.registry import BackendRegistry
from hpc.scheduler.capacity import load_time, predicted_wait
from hpc.scheduler.episode import Episode
from hpc.scheduler.policy import Snapshot

log = logging.getLogger(__name__)


class StartEstimates:
    """Asks the job system about pending jobs only, with a timeout on each call."""

    def __init__(self) -> None:
        self._outage = Episode(log, "Slurm's start estimates are back after %.0f s")
        self.last: dict[str, float | None] = {}  # the latest read, for the observe step

    async def read(
        self, jobs: JobSystem, infos: list[JobInfo], limit_s: float, now: float
    ) -> dict[str, float | None]:
        """Job id -> expected start of each pending job; {} when none is pending or the
        job system cannot say now."""
        self.last = {}
        pending = [info.job_id for info in infos if info.state == "PENDING"]
        if not pending:
            return self.last
        try:
            async with asyncio.timeout(limit_s):
                self.last = await jobs.expected_starts(pending)
        except Exception as error:  # unknown estimates: the policy decides without them
            self._outage.failed(now, f"cannot read start estimates: {error or 'timed out'}")
            return self.last
        self._outage.ok(now)
        return self.last


def publish_waits(registry: BackendRegistry, snapshot: Snapshot, now: float) -> None:
    """Each service's predicted wait (capacity.py) for the router: Retry-After of a cold
    service's 503, and `predicted_wait` in /v1/models."""
    at = time.monotonic()  # the registry keeps the router's clock
    for service in snapshot.services:
        wait = predicted_wait(service, now, load_time(service))
        registry.publish_wait(service.config.name, wait, at)
