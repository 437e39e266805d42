"""Where a service's jobs go: pure choices among its candidate placements.

A service lists placements (partitions, QOS, reservations; `ServiceConfig.candidates`),
and the observe step asks Slurm when a new job would start in each (`sbatch --test-only`,
`ServiceSnapshot.placement_starts`). A new job goes where the predicted start is soonest;
unknown predictions rank after known ones, and ties (or no prediction at all) keep the
config's order. The floor (`min_instances`) lives on placements that are not preemptible;
instances above it may take a preemptible one when it starts sooner. A pending job is
moved once to a placement predicted `replace_pending_gain` earlier than its own expected
start (`squeue --start`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from hpc.config import Placement, ServiceConfig
from hpc.jobs.system import JobInfo
from hpc.scheduler.snapshot import JobView, ServiceSnapshot


def placement_of(config: ServiceConfig, info: JobInfo) -> str | None:
    """The name of the candidate a job is queued in, from what Slurm lists for it (the
    most specific match, then config order); None when none matches (config changed).
    An unset partition or QOS matches any (Slurm fills in its default); a reservation
    must be the same, none included. A service without placements has one, "", which
    every job of it is in."""
    if not config.placements:
        return ""
    seen = (info.partition, info.qos, info.reservation)
    best: tuple[int, str] | None = None
    for placement in config.candidates:
        asked = placement.slurm_key
        if any(want and want != got for want, got in zip(asked, seen, strict=True)):
            continue
        if asked[2] != info.reservation:
            continue
        score = sum(1 for want in asked if want)
        if best is None or score > best[0]:
            best = (score, placement.name or "")
    return best[1] if best is not None else None


def predicted_starts(service: ServiceSnapshot) -> dict[str, float | None]:
    """Placement name -> Slurm's predicted start of a new job there (None: unknown)."""
    return {entry.placement: entry.start for entry in service.placement_starts}


def ranked(service: ServiceSnapshot, floor: bool) -> list[Placement]:
    """The candidates a new job may use, soonest predicted start first (unknown after
    known, then config order); for a floor instance only those that are not preemptible."""
    starts = predicted_starts(service)
    allowed = [p for p in service.config.candidates if not (floor and p.preemptible)]

    def key(item: tuple[int, Placement]) -> tuple[bool, float, int]:
        index, placement = item
        start = starts.get(placement.name or "")
        return (start is None, start if start is not None else 0.0, index)

    return [placement for _index, placement in sorted(enumerate(allowed), key=key)]


def choose(service: ServiceSnapshot, floor: bool) -> str:
    """The placement of the next new job ("" for a service without placements)."""
    best = ranked(service, floor)
    return (best[0].name or "") if best else ""


def preemptible(service: ServiceSnapshot, job: JobView) -> bool:
    """Whether the job sits where Slurm may preempt it. A job matching no current candidate
    counts as preemptible: it must not hold the floor up in place of a guaranteed job."""
    if not service.config.placements:
        return False
    if job.placement is None:
        return True
    by_name = {p.name: p for p in service.config.candidates}
    candidate = by_name.get(job.placement)
    return candidate is None or candidate.preemptible


def floor_count(service: ServiceSnapshot, jobs: Iterable[JobView]) -> int:
    """How many of these instances hold the floor (are not preemptible)."""
    return sum(1 for job in jobs if not preemptible(service, job))


@dataclass(frozen=True)
class Move:
    """Cancel a pending job and submit its replacement where it starts sooner."""

    job: JobView
    placement: str
    start: float  # predicted start there


def pending_moves(service: ServiceSnapshot, jobs: Iterable[JobView], floor: set[str]) -> list[Move]:
    """Pending jobs worth moving: Slurm expects each to start (its own `squeue --start`)
    at least `replace_pending_gain` after another allowed placement is predicted to. Never
    a job that was moved already (no ping-pong), nor one whose start nobody knows; a job
    in `floor` only to a placement that is not preemptible. Only predictions Slurm made
    after the job was queued count: an older one did not see the job itself, nor what
    happened since (a preemption that freed or took GPUs)."""
    gain = service.config.replace_pending_gain
    moves: list[Move] = []
    for job in jobs:
        expected = job.expected_start
        if job.info.running or job.cancelled or job.draining or job.moved_from is not None:
            continue
        if expected is None or job.placement is None:
            continue
        starts = {
            entry.placement: entry.start
            for entry in service.placement_starts
            if entry.observed_at >= job.first_seen
        }
        for placement in ranked(service, floor=job.job_id in floor):
            name = placement.name or ""
            start = starts.get(name)
            if name == job.placement or start is None:
                continue
            if start + gain <= expected:
                moves.append(Move(job, name, start))
            break  # only the soonest other placement is worth comparing
    return moves
