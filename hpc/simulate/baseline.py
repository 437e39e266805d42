"""The baseline: the reference system's scaling, as a pure policy over the same `Snapshot`.

It scales on the moving average of the requests in flight over the last 60 s divided by
one instance's capacity: target = ceil(average / capacity) within [min, max]. It never
scales down on purpose (a job just runs out at its time limit and the target is met again
by a new one), never renews ahead of the limit, and knows nothing of Slurm's queue. Its
router answers 503 when a service is cold: the engine's `Policy.cold_reject_after`.
"""

from __future__ import annotations

import math

from hpc.scheduler.policy import Action, Decision, ServiceSnapshot, Snapshot, Submit, gpus_per_job
from hpc.simulate.world import BASELINE_WINDOW_S

COLD_REJECT_AFTER_S = 5.0


def moving_average(service: ServiceSnapshot, now: float) -> float:
    samples = [s.load for s in service.load if s.at >= now - BASELINE_WINDOW_S]
    return sum(samples) / len(samples) if samples else 0.0


def baseline_target(service: ServiceSnapshot, now: float) -> int:
    config = service.config
    wanted = math.ceil(moving_average(service, now) / config.target_concurrency)
    return max(config.min_instances, min(config.max_instances, wanted))


def baseline_decide(snapshot: Snapshot, now: float) -> Decision:
    """Submit jobs until each service holds its target (pending jobs count), within the cap."""
    used = sum(gpus_per_job(s.config) * len(s.jobs) for s in snapshot.services)
    actions: list[Action] = []
    for service in snapshot.services:
        need = gpus_per_job(service.config)
        for _ in range(len(service.jobs), baseline_target(service, now)):
            if snapshot.max_total_gpus is not None and used + need > snapshot.max_total_gpus:
                break
            used += need
            actions.append(Submit(service.config.name, "baseline: moving average"))
    return Decision(actions=tuple(actions), backoff={})
