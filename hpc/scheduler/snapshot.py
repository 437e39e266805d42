"""What the scheduling policy sees: the agent's jobs and each service's state at one
moment (`Snapshot`), built by the observe step (observation.py) or by the simulator.

Apart from `policy.py` so that pure helpers of the policy (capacity.py) can read it
without an import circle; `policy.py` re-exports every name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hpc.config import ServiceConfig
from hpc.jobs.system import JobInfo


@dataclass(frozen=True)
class JobView:
    """One of the agent's jobs as the policy sees it."""

    info: JobInfo
    first_seen: float
    running_since: float | None = None
    ready_since: float | None = None
    health_failures: int = 0
    draining: bool = False
    cancelled: bool = False
    replaces: str | None = None
    in_flight: int = 0
    operator_drain: str = ""  # "", OPERATOR_REPLACE or OPERATOR_NOW
    expected_start: float | None = None  # a pending job's start as Slurm estimates it
    placement: str | None = None  # the service's placement it was queued in; None: unknown
    moved_from: str | None = None  # the pending job it replaced on a sooner placement

    @property
    def job_id(self) -> str:
        return self.info.job_id

    @property
    def ready(self) -> bool:
        return self.ready_since is not None


@dataclass(frozen=True)
class LostJob:
    """A job Slurm no longer lists (finished, killed, cancelled)."""

    job_id: str
    was_ready: bool
    cancelled: bool


@dataclass(frozen=True)
class Backoff:
    """Consecutive failed starts of a service and when the next submission may happen."""

    failures: int = 0
    last_failure: float | None = None
    not_before: float | None = None

    def blocks(self, now: float) -> bool:
        return self.not_before is not None and now < self.not_before


@dataclass(frozen=True)
class LoadSample:
    """A service's load at one moment, as the router and as its backends count it."""

    at: float
    routed: int  # the router's requests in flight plus those queued for a backend
    in_backends: int = 0  # the backends' own running plus waiting requests (vLLM /metrics)

    @property
    def load(self) -> int:
        """The scaling signal. The larger count, not the sum: a routed request is also
        running or waiting in a backend. The backends also see requests that came by
        other paths and requests queued inside them."""
        return max(self.routed, self.in_backends)


@dataclass(frozen=True)
class PlacementStart:
    """When Slurm predicted a new job of the service would start in one of its placements
    (`sbatch --test-only`), and when it was asked."""

    placement: str  # the placement's name (ServiceConfig.candidates)
    start: float | None  # epoch s; None: Slurm gave no prediction (failed, no answer)
    observed_at: float


@dataclass(frozen=True)
class ServiceSnapshot:
    config: ServiceConfig
    jobs: tuple[JobView, ...] = ()
    lost: tuple[LostJob, ...] = ()
    load: tuple[LoadSample, ...] = ()
    demand_since: float | None = None
    backoff: Backoff = field(default_factory=Backoff)
    placement_starts: tuple[PlacementStart, ...] = ()  # latest per placement; may be absent


@dataclass(frozen=True)
class Snapshot:
    services: tuple[ServiceSnapshot, ...]
    health_failures: int = 3
    max_total_gpus: int | None = None
    orphans: tuple[JobView, ...] = ()  # our jobs of services no longer configured
