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

import heapq
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

    def gpus_free_at(self, now: float, gpus: int, waiting: bool = True) -> float:
        """When Slurm's plan has `gpus` of the GPUs ours may hold here free for one more
        job: after our running jobs' time limits and our jobs queued ahead of it (those
        waiting for a GPU, and with `waiting` those still in the queue), in order. `now`
        without a limit."""
        limit = self.model.gpus
        if limit is None:
            return now
        if gpus > limit:
            return math.inf
        free = [now] * max(0, limit - self.gpus_used())
        for job in self.running:
            free += [(job.started or now) + job.time_limit_s] * job.gpus
        heapq.heapify(free)
        for job in (*self.blocked, *(self.waiting if waiting else ())):
            if job.gpus > limit:
                continue
            start = max([job.planned_start or now, *(heapq.heappop(free) for _ in range(job.gpus))])
            for _ in range(job.gpus):
                heapq.heappush(free, start + job.time_limit_s)
        return max(heapq.nsmallest(gpus, free), default=now)


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
        return max(now + fresh[1] * fresh[2], queue.gpus_free_at(now, gpus))

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
        job.planned_start = max(now + wait * error, queue.gpus_free_at(now, job.gpus))
        queue.waiting.append(job)
        return now + wait

    def try_start(self, job: SimJob, now: float) -> bool:
        """The job waited out the queue: it starts if its partition has a GPU free, else it
        waits (FIFO) for one of ours there to end."""
        queue = self.queues[job.queue_key]
        if job in queue.waiting:
            queue.waiting.remove(job)
        if queue.blocked or not queue.has_room(job.gpus):
            job.planned_start = queue.gpus_free_at(now, job.gpus, waiting=False)  # new plan
            queue.blocked.append(job)
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
