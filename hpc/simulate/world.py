"""The simulated world's state: jobs as Slurm holds them, requests as the router holds them,
and the agent's view of both as the policy's `Snapshot`.

The agent sees the world without delay: a job's start, readiness and end are observed at
the next step (the real prober wakes the loop when a job becomes ready).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from hpc.config import ServiceConfig
from hpc.jobs.system import JobInfo
from hpc.scheduler.policy import (
    Backoff,
    JobView,
    LoadSample,
    LostJob,
    PlacementStart,
    ServiceSnapshot,
    Snapshot,
)
from hpc.simulate.trace import Request

# The baseline averages the load over this window; the history keeps at least this much.
BASELINE_WINDOW_S = 60.0
# The router's expected wait counts the dispatches of the last minute (hpc.router.policy).
DISPATCH_WINDOW_S = 60.0


@dataclass
class SimJob:
    job_id: str
    service: str
    gpus: int
    submitted: float
    time_limit_s: float
    replaces: str | None = None
    planned_start: float | None = None  # Slurm's estimate (hpc/simulate/partitions.py)
    placement: str = ""  # the service's placement it was submitted to
    moved_from: str | None = None  # the pending job it took the place of
    queue_key: str = ""  # the queue it waits in (SimConfig.queue_for)
    started: float | None = None
    ready_at: float | None = None
    ended: float | None = None
    end_reason: str = ""
    draining: bool = False
    cancelled: bool = False
    flights: list[Flight] = field(default_factory=list)  # requests running on it

    @property
    def in_flight(self) -> int:
        return len(self.flights)

    @property
    def ready(self) -> bool:
        return self.ready_at is not None and self.ended is None

    @property
    def routable(self) -> bool:
        return self.ready and not self.draining

    def gpu_seconds(self, until: float) -> float:
        if self.started is None or self.started >= until:
            return 0.0
        return (min(self.ended if self.ended is not None else until, until) - self.started) * (
            self.gpus
        )

    def info(self, now: float) -> JobInfo:
        running = self.started is not None
        left = self.time_limit_s - (now - self.started) if self.started is not None else None
        return JobInfo(
            job_id=self.job_id,
            service=self.service,
            state="RUNNING" if running else "PENDING",
            time_limit_s=int(self.time_limit_s),
            time_left_s=int(left) if left is not None else int(self.time_limit_s),
            start_time=self.started,
            submit_time=self.submitted,
            nodes=("sim",) if running else (),
            reason="" if running else "Priority",
        )


@dataclass
class Flight:
    """One attempt of a request on its way: queued, then on a job, then done, rejected or
    cut off. A client's retry of a rejected request is a new attempt (a new Flight) whose
    `request.at` is the retry's arrival; `origin` is the first attempt's."""

    request: Request
    job: SimJob | None = None
    started: float | None = None
    first_token: float | None = None
    finished: float | None = None
    outcome: str = ""  # "", "done", "rejected", "interrupted"
    origin: float = -1.0  # the first attempt's arrival (-1: this is the first)
    attempt: int = 0  # 0 for the first, n for the n-th retry
    gave_up: bool = False  # rejected and not retried: the client gave up

    def __post_init__(self) -> None:
        if self.origin < 0:
            self.origin = self.request.at


@dataclass
class ServiceWorld:
    config: ServiceConfig
    jobs: list[SimJob] = field(default_factory=list)
    queue: deque[Flight] = field(default_factory=deque)
    lost: list[LostJob] = field(default_factory=list)
    loads: deque[LoadSample] = field(default_factory=deque)
    demand_since: float | None = None
    backoff: Backoff = field(default_factory=Backoff)
    dispatched: deque[float] = field(default_factory=deque)  # the router's recent dispatches
    starts: dict[str, PlacementStart] = field(default_factory=dict)  # --test-only, per placement

    @property
    def name(self) -> str:
        return self.config.name

    def live_jobs(self) -> list[SimJob]:
        return [job for job in self.jobs if job.ended is None]

    def in_flight(self) -> int:
        return sum(job.in_flight for job in self.live_jobs())

    def queued(self) -> int:
        return sum(1 for flight in self.queue if not flight.outcome)

    def sample_load(self, now: float) -> None:
        sample = LoadSample(now, self.in_flight() + self.queued())
        self.loads.append(sample)
        window = max(self.config.look_back + self.config.scale_down_delay, BASELINE_WINDOW_S)
        while self.loads and self.loads[0].at < now - window:
            self.loads.popleft()

    def end_job(self, job: SimJob, now: float, reason: str) -> None:
        job.ended, job.end_reason = now, reason
        self.lost.append(
            LostJob(job.job_id, was_ready=job.ready_at is not None, cancelled=job.cancelled)
        )

    def view(self, job: SimJob, now: float, alive: set[str]) -> JobView:
        return JobView(
            info=job.info(now),
            first_seen=job.submitted,
            running_since=job.started,
            ready_since=job.ready_at,
            draining=job.draining,
            cancelled=job.cancelled,
            replaces=job.replaces if job.replaces in alive else None,
            in_flight=job.in_flight,
            expected_start=job.planned_start if job.started is None else None,
            placement=job.placement,
            moved_from=job.moved_from,
        )

    def note_dispatch(self, now: float) -> None:
        """A request got a slot; the router's expected wait reads the last minute of them."""
        self.dispatched.append(now)
        while self.dispatched and self.dispatched[0] < now - DISPATCH_WINDOW_S:
            self.dispatched.popleft()

    def snapshot(self, now: float, consume: bool = True) -> ServiceSnapshot:
        """What the agent's observe step would hand the policy; lost jobs are reported once
        (unless `consume` is false: a look that is not an agent step)."""
        lost = tuple(self.lost)
        if consume:
            self.lost = []
        live = self.live_jobs()
        alive = {job.job_id for job in live}
        return ServiceSnapshot(
            config=self.config,
            jobs=tuple(self.view(job, now, alive) for job in live),
            lost=lost,
            load=tuple(self.loads),
            demand_since=self.demand_since,
            backoff=self.backoff,
            placement_starts=tuple(self.starts.values()),
        )


def snapshot(services: list[ServiceWorld], now: float, max_total_gpus: int | None) -> Snapshot:
    return Snapshot(
        services=tuple(s.snapshot(now) for s in services),
        max_total_gpus=max_total_gpus,
    )
