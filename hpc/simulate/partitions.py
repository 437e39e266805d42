"""Slurm's queues in the simulated world: one per partition (or partition/QOS), each with
its start-wait model, optionally a limit on the GPUs our jobs may hold in it at once, and
what Slurm *predicts* about it, with an error.

Slurm's predictions (`sbatch --test-only` for a job not yet submitted, `squeue --start` for
a pending one) come from its backfill plan: they miss jobs submitted later with a higher
priority and running jobs that end before their limit, so they are not exact. The model:
the prediction of a wait `w` is `w * e`, `e` log-normal with median 1 and sigma
`estimate_error` (0.5: 95 % of predictions within /2.7 and x2.7 of the truth). A
`--test-only` answer is informative: the wait it predicts (before the error) is the one a
job submitted there next really gets, if it is submitted within `placement_probe_interval`.
A partition whose GPU limit our jobs fill starts the next job only when one of ours ends;
Slurm then predicts the earliest time limit of ours there, as its plan does.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field

from hpc.simulate.config import QueueModel, SimConfig
from hpc.simulate.world import SimJob


@dataclass
class Partition:
    """One queue: our jobs running in it, those waiting for a GPU of it, the next wait."""

    key: str
    model: QueueModel
    running: list[SimJob] = field(default_factory=list)
    waiting: list[SimJob] = field(default_factory=list)  # ours submitted here, not started
    blocked: deque[SimJob] = field(default_factory=deque)  # waited out, no GPU free
    next_wait: tuple[float, float, float] | None = None  # (asked at, true wait, error factor)

    def gpus_used(self) -> int:
        return sum(job.gpus for job in self.running)

    def has_room(self, gpus: int) -> bool:
        limit = self.model.gpus
        return limit is None or self.gpus_used() + gpus <= limit

    def room_after_ours(self, gpus: int) -> bool:
        """Room for one more job once our jobs already queued here have started: Slurm's
        plan puts a new job behind those (same priority, submitted earlier)."""
        limit = self.model.gpus
        queued = sum(job.gpus for job in self.waiting)
        return limit is None or self.gpus_used() + queued + gpus <= limit

    def earliest_end(self) -> float | None:
        """When Slurm plans a GPU of ours here to be free: the soonest time limit of our
        jobs running or queued here (a queued one from its planned start)."""
        ends = [job.started + job.time_limit_s for job in self.running if job.started is not None]
        ends += [j.planned_start + j.time_limit_s for j in self.waiting if j.planned_start]
        return min(ends, default=None)


class Partitions:
    """Every queue of the world; the engine asks it where and when a job starts."""

    def __init__(self, config: SimConfig, seed: int) -> None:
        self.config = config
        self.queues: dict[str, Partition] = {}
        self.wait_rng = random.Random(f"queue:{seed}")
        self.error_rng = random.Random(f"estimate:{seed}")

    def of(self, partition: str | None, qos: str | None) -> Partition:
        key, model = self.config.queue_for(partition, qos)
        if key not in self.queues:
            self.queues[key] = Partition(key, model)
        return self.queues[key]

    def error(self) -> float:
        sigma = self.config.estimate_error
        return math.exp(self.error_rng.gauss(0.0, sigma)) if sigma > 0 else 1.0

    def predict(self, queue: Partition, gpus: int, now: float) -> float:
        """`sbatch --test-only`: when a job submitted now would start (with the error)."""
        fresh = queue.next_wait
        if fresh is None or now - fresh[0] > self.config.placement_probe_interval:
            fresh = (now, queue.model.sample(self.wait_rng), self.error())
            queue.next_wait = fresh
        start = now + fresh[1] * fresh[2]
        end = queue.earliest_end()
        if not queue.room_after_ours(gpus) and end is not None:
            start = max(start, end)
        return start

    def plan(self, job: SimJob, queue: Partition, now: float) -> float:
        """A job submitted now: when it will have waited out the queue, and what `squeue
        --start` says of it (`job.planned_start`, with the error)."""
        fresh = queue.next_wait
        if fresh is not None and now - fresh[0] <= self.config.placement_probe_interval:
            wait, error = fresh[1], fresh[2]
        else:
            wait, error = queue.model.sample(self.wait_rng), self.error()
        queue.next_wait = None  # used: the next job draws its own
        job.queue_key = queue.key
        job.planned_start = now + wait * error
        end = queue.earliest_end()
        if not queue.room_after_ours(job.gpus) and end is not None:
            job.planned_start = max(job.planned_start, end)
        queue.waiting.append(job)
        return now + wait

    def try_start(self, job: SimJob) -> bool:
        """The job waited out the queue: it starts if its partition has a GPU free, else it
        waits (FIFO) for one of ours there to end."""
        queue = self.queues[job.queue_key]
        if job in queue.waiting:
            queue.waiting.remove(job)
        if queue.blocked or not queue.has_room(job.gpus):
            queue.blocked.append(job)
            job.planned_start = queue.earliest_end() or job.planned_start  # Slurm's new plan
            return False
        queue.running.append(job)
        return True

    def release(self, job: SimJob) -> list[SimJob]:
        """A job ended (or was cancelled while pending): the blocked jobs that start now."""
        queue = self.queues.get(job.queue_key)
        if queue is None:
            return []
        for jobs in (queue.running, queue.waiting, queue.blocked):
            if job in jobs:
                jobs.remove(job)
        starting: list[SimJob] = []
        while queue.blocked and queue.has_room(queue.blocked[0].gpus):
            starting.append(queue.blocked.popleft())
            queue.running.append(starting[-1])
        return starting
