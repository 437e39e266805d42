"""The discrete-event simulator: a request trace through a router, jobs through a modelled
Slurm queue, and a scaling policy called the way the agent calls it.

`simulate(config, trace, policy, ...)` runs one policy: the agent's real `decide` or the
baseline. Time is simulated: events (arrivals, job starts, readiness, time limits,
preemptions, request completions, router time-outs, agent steps) are taken in time order
from a heap; nothing sleeps and nothing reads a clock.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from hpc.router.policy import expected_wait
from hpc.scheduler.capacity import load_time, predicted_wait
from hpc.scheduler.placement_probes import may_submit
from hpc.scheduler.policy import (
    Cancel,
    Decision,
    Drain,
    PlacementStart,
    Snapshot,
    Submit,
    gpus_per_job,
)
from hpc.simulate.client import next_attempt, retry_after
from hpc.simulate.config import SimConfig
from hpc.simulate.partitions import Partitions
from hpc.simulate.trace import Request
from hpc.simulate.world import Flight, ServiceWorld, SimJob, snapshot

DecideFn = Callable[[Snapshot, float], Decision]
# After the last arrival the run goes on this long, so queued requests finish or time out.
GRACE_S = 600.0
# The agent's router's Retry-After for a cold service with no estimate (RETRY_AFTER_NOT_READY).
RETRY_AFTER_UNKNOWN_S = 30.0


@dataclass(frozen=True)
class Policy:
    """A scaling policy and how the router in front of it treats a cold service."""

    name: str
    decide: DecideFn
    cold_reject_after: float | None = (
        None  # reject a request that waited this long for a first instance
    )
    sends_retry_after: bool = True  # its router's 503 carries Retry-After


@dataclass(frozen=True)
class Tick:
    """The world at one agent step, for the plot."""

    at: float
    load: int
    ready: int
    held: int  # jobs running (ready or loading)
    pending: int


@dataclass
class Run:
    """What one simulated run produced."""

    policy: str
    horizon: float
    flights: list[Flight]
    jobs: list[SimJob]
    ticks: list[Tick] = field(default_factory=list)
    give_up: float = 600.0  # the clients' give_up: a given-up request's felt wait


class Simulator:
    def __init__(self, config: SimConfig, policy: Policy, seed: int) -> None:
        self.config, self.policy = config, policy
        self.services = {s.name: ServiceWorld(s) for s in config.services}
        self.partitions = Partitions(config, seed)
        self.preempt_rng = random.Random(f"preempt:{seed}")
        self.client_rng = random.Random(f"client:{seed}")
        self.events: list[tuple[float, int, str, Any]] = []
        self.counter = itertools.count()
        self.flights: list[Flight] = []
        self.ticks: list[Tick] = []
        self.now = 0.0
        self.job_numbers = itertools.count(1)

    def push(self, at: float, kind: str, payload: Any = None) -> None:
        heapq.heappush(self.events, (at, next(self.counter), kind, payload))

    def run(self, trace: list[Request], duration: float) -> Run:
        self.warm_start()
        for request in trace:
            if request.service in self.services:
                self.push(request.at, "arrive", Flight(request))
        horizon = duration + GRACE_S
        for step in range(math.ceil(horizon / self.config.poll_interval) + 1):
            self.push(step * self.config.poll_interval, "tick", True)
        while self.events and self.events[0][0] <= horizon:
            self.now, _, kind, payload = heapq.heappop(self.events)
            getattr(self, f"on_{kind}")(payload)
        jobs = [job for s in self.services.values() for job in s.jobs]
        give_up = self.config.client.give_up
        return Run(self.policy.name, horizon, self.flights, jobs, self.ticks, give_up)

    # -- requests ---------------------------------------------------------------------
    def on_arrive(self, flight: Flight) -> None:
        world = self.services[flight.request.service]
        self.flights.append(flight)
        if world.queued() >= self.config.max_queue:
            self.reject(flight)
            return
        world.queue.append(flight)
        cold = not any(job.routable for job in world.jobs)
        if cold and world.demand_since is None:
            world.demand_since = self.now
            self.push(self.now, "tick", False)  # the router wakes the agent
        limit = self.config.queue_timeout
        if cold and self.policy.cold_reject_after is not None:
            limit = min(limit, self.policy.cold_reject_after)
        self.push(self.now + limit, "timeout", flight)
        self.dispatch(world)

    def on_timeout(self, flight: Flight) -> None:
        if not flight.outcome and flight.job is None:
            self.reject(flight)

    def reject(self, flight: Flight) -> None:
        """A 503: the client retries after the Retry-After (or its own back-off), or gives up."""
        self.finish(flight, "rejected")
        wait = self.retry_after(self.services[flight.request.service])
        at = next_attempt(
            self.config.client,
            self.client_rng,
            origin=flight.origin,
            now=self.now,
            attempt=flight.attempt,
            retry_after_s=wait,
        )
        if at is None:
            flight.gave_up = True
            return
        again = Flight(replace(flight.request, at=at), origin=flight.origin)
        again.attempt = flight.attempt + 1
        self.push(at, "arrive", again)

    def retry_after(self, world: ServiceWorld) -> float | None:
        """The Retry-After the policy's router sends, as hpc/router/forwarding.py computes
        it: a cold service's predicted wait (Slurm's estimate + load time), else the
        queue's expected wait at the recent dispatch rate."""
        if not self.policy.sends_retry_after:
            return None
        if not any(job.routable for job in world.jobs):
            view = world.snapshot(self.now, consume=False)
            predicted = predicted_wait(view, self.now, load_time(view))
            return RETRY_AFTER_UNKNOWN_S if predicted is None else retry_after(predicted)
        return retry_after(expected_wait(world.queued() + 1, list(world.dispatched), self.now))

    def on_done(self, flight: Flight) -> None:
        job = flight.job
        if flight.outcome or job is None:
            return  # cut off by the job's end
        job.flights.remove(flight)
        self.finish(flight, "done")
        self.dispatch(self.services[job.service])

    def finish(self, flight: Flight, outcome: str) -> None:
        flight.outcome, flight.finished = outcome, self.now

    def dispatch(self, world: ServiceWorld) -> None:
        """Queued requests to the routable job with the fewest in flight, while one has room."""
        slots = self.config.instance_of(world.name).concurrency
        while world.queue:
            if world.queue[0].outcome:
                world.queue.popleft()
                continue
            free = [j for j in world.jobs if j.routable and j.in_flight < slots]
            if not free:
                return
            job = min(free, key=lambda j: j.in_flight)
            self.start_request(world.queue.popleft(), job)

    def start_request(self, flight: Flight, job: SimJob) -> None:
        model = self.config.instance_of(job.service)
        request = flight.request
        flight.job, flight.started = job, self.now
        job.flights.append(flight)
        self.services[job.service].note_dispatch(self.now)
        prefill = request.prompt_tokens / model.prefill_tokens_per_s
        flight.first_token = self.now + prefill
        self.push(flight.first_token + request.output_tokens / model.tokens_per_s, "done", flight)

    # -- jobs -------------------------------------------------------------------------
    def warm_start(self) -> None:
        """A run starts as an agent that has been up for a while: min_instances jobs ready."""
        for world in self.services.values():
            floor = [p.name or "" for p in world.config.candidates if not p.preemptible]
            for _ in range(world.config.min_instances):
                job = self.submit(world.name, None, start=False, placement=floor[0])
                if self.partitions.try_start(job, self.now):  # else: behind a GPU limit
                    self.begin(job)
                    job.ready_at = 0.0

    def submit(
        self, service: str, replaces: str | None, start: bool = True, placement: str = ""
    ) -> SimJob:
        """Queue a job of the service in Slurm (the queue of the placement's partition and
        QOS); it starts after the queue's wait, or at once (`start=False`: warm start)."""
        world = self.services[service]
        config = world.config
        placed = config.placed(placement).resources
        queue = self.partitions.of(placed.partition, placed.qos)
        job = SimJob(
            job_id=str(next(self.job_numbers)),
            service=service,
            gpus=gpus_per_job(config),
            submitted=self.now,
            time_limit_s=float(config.resources.time_limit_seconds),
            replaces=replaces,
            placement=placement,
            queue_key=queue.key,
        )
        world.jobs.append(job)
        if start:
            self.push(self.partitions.plan(job, queue, self.now), "start", job)
        return job

    def on_start(self, job: SimJob) -> None:
        """The job waited out its queue: it runs if its partition has a GPU free for it."""
        if job.ended is None and self.partitions.try_start(job, self.now):
            self.begin(job)

    def begin(self, job: SimJob) -> None:
        job.started = self.now
        self.push(self.now + self.config.instance_of(job.service).load_time, "ready", job)
        self.push(self.now + job.time_limit_s, "end", (job, "time limit"))
        queue = self.partitions.queues[job.queue_key].model
        rate = self.config.preemption_rate(queue) * job.gpus / 3600
        if rate > 0:
            self.push(self.now + self.preempt_rng.expovariate(rate), "end", (job, "preempted"))

    def on_ready(self, job: SimJob) -> None:
        if job.ended is not None or job.ready_at is not None:
            return  # ended, or ready since the warm start
        job.ready_at = self.now
        world = self.services[job.service]
        world.demand_since = None
        self.dispatch(world)
        self.push(self.now, "tick", False)  # the prober wakes the agent

    def on_end(self, payload: tuple[SimJob, str]) -> None:
        job, reason = payload
        if job.ended is None:
            self.stop_job(job, reason)

    def stop_job(self, job: SimJob, reason: str) -> None:
        """The job ends: requests still running on it are cut off."""
        for flight in job.flights:
            self.finish(flight, "interrupted")
        job.flights.clear()
        self.services[job.service].end_job(job, self.now, reason)
        for starting in self.partitions.release(job):  # its GPUs go to one waiting for them
            self.begin(starting)

    # -- the agent ----------------------------------------------------------------------
    def on_tick(self, regular: bool) -> None:
        worlds = list(self.services.values())
        if regular:
            for world in worlds:
                world.sample_load(self.now)
            self.record()
        for world in worlds:
            self.probe_placements(world)
        decision = self.policy.decide(
            snapshot(worlds, self.now, self.config.max_total_gpus), self.now
        )
        for world in worlds:
            world.backoff = decision.backoff.get(world.name, world.backoff)
        for action in decision.actions:
            self.act(action)

    def probe_placements(self, world: ServiceWorld) -> None:
        """What the agent's `sbatch --test-only` of each placement would answer, asked as
        `hpc/scheduler/placement_probes.py` asks: for a service with two or more
        placements that may submit or move a job soon, at most once per
        `placement_probe_interval`; between probes the policy sees the last answers."""
        config, every = world.config, self.config.placement_probe_interval
        if len(config.candidates) < 2:
            return
        asked = max((start.observed_at for start in world.starts.values()), default=None)
        if asked is not None and self.now - asked < every:
            return
        if not may_submit(world.snapshot(self.now, consume=False), self.now, every):
            return
        for candidate in config.candidates:
            name = candidate.name or ""
            queue = self.partitions.of(candidate.partition, candidate.qos)
            start = self.partitions.predict(queue, gpus_per_job(config), self.now)
            world.starts[name] = PlacementStart(name, start, self.now)

    def act(self, action: object) -> None:
        if isinstance(action, Submit):
            new = self.submit(action.service, action.replaces, placement=action.placement)
            new.moved_from = action.moves  # the policy's next action cancels that one
            return
        if not isinstance(action, Cancel | Drain):
            return  # warnings only show in the real agent's status
        world = self.services.get(action.service)
        job = next((j for j in world.jobs if j.job_id == action.job_id), None) if world else None
        if job is None or job.ended is not None:
            return
        if isinstance(action, Drain):
            job.draining = True
        else:
            job.cancelled = True
            self.stop_job(job, "cancelled")

    def record(self) -> None:
        worlds = list(self.services.values())
        live = [job for world in worlds for job in world.live_jobs()]
        self.ticks.append(
            Tick(
                at=self.now,
                load=sum(w.in_flight() + w.queued() for w in worlds),
                ready=sum(1 for job in live if job.ready),
                held=sum(1 for job in live if job.started is not None),
                pending=sum(1 for job in live if job.started is None),
            )
        )


def simulate(
    config: SimConfig, trace: list[Request], policy: Policy, seed: int, duration: float
) -> Run:
    """One run of `policy` over `trace` (arrivals up to `duration`, then a grace period)."""
    return Simulator(config, policy, seed).run(trace, duration)
