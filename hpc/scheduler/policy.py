"""The scheduling policy: which jobs to submit, cancel and drain, decided from a snapshot.

Pure: `decide(snapshot, now)` never awaits, reads a clock or touches Slurm, files or HTTP;
the agent observes into a `Snapshot`, calls `decide`, and carries out the actions in order.
An *instance* is one serving slot of a service. A renewal pair (an old job and the
replacement submitted before the old one's time limit) is one instance, so the
replacement never counts as scaling up. A *draining* job takes no new requests and is
cancelled once its in-flight count reaches zero.
An operator can ask for a job to be drained (`saia hpc drain`): with `replace`, it is
handed over like a renewal (replacement first, one such hand-over per service at a time,
oldest job first); with `now`, it drains at once and the scaling rules replace it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from hpc.config import ServiceConfig
from hpc.scheduler.capacity import queued_behind
from hpc.scheduler.placement import choose, floor_count, pending_moves, preemptible
from hpc.scheduler.snapshot import Backoff as Backoff
from hpc.scheduler.snapshot import JobView as JobView
from hpc.scheduler.snapshot import LoadSample as LoadSample
from hpc.scheduler.snapshot import LostJob as LostJob
from hpc.scheduler.snapshot import PlacementStart as PlacementStart
from hpc.scheduler.snapshot import ServiceSnapshot as ServiceSnapshot
from hpc.scheduler.snapshot import Snapshot as Snapshot

# A draining job this close to its limit is cancelled even with requests in flight:
# Slurm is about to kill it anyway, and a clean SIGTERM lets the server finish cleanly.
DRAIN_DEADLINE_S = 5
OPERATOR_REPLACE = "replace"  # JobView.operator_drain: hand over to a replacement first
OPERATOR_NOW = "now"  # drain at once
# Where a job that ran is after Slurm requeued it (it runs again later, same id).
REQUEUED_STATES = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"})


@dataclass(frozen=True)
class Submit:
    """Queue one job of the service in `placement` (a name of ServiceConfig.candidates; ""
    for a service without placements). With `moves`, the new job takes the place of that
    pending job, which the next action cancels (the agent keeps it if this submit fails)."""

    service: str
    reason: str
    replaces: str | None = None
    placement: str = ""
    moves: str | None = None


@dataclass(frozen=True)
class Cancel:
    service: str
    job_id: str
    reason: str


@dataclass(frozen=True)
class Drain:
    service: str
    job_id: str
    reason: str


@dataclass(frozen=True)
class Warn:
    service: str
    message: str
    job_id: str | None = None


Action = Submit | Cancel | Drain | Warn


@dataclass(frozen=True)
class Decision:
    actions: tuple[Action, ...]
    backoff: dict[str, Backoff]


def gpus_per_job(config: ServiceConfig) -> int:
    return config.resources.gpus * config.resources.nodes


def after_failure(backoff: Backoff, now: float, config: ServiceConfig) -> Backoff:
    """One more failed start: the wait doubles each time, up to startup_backoff_max."""
    failures = backoff.failures + 1
    wait = min(config.startup_backoff * 2 ** (failures - 1), config.startup_backoff_max)
    return Backoff(failures=failures, last_failure=now, not_before=now + wait)


def desired_instances(service: ServiceSnapshot, now: float) -> int:
    """Instances wanted now: the peak load over look_back, held for scale_down_delay.

    Taking the peak over `look_back + scale_down_delay` scales up at once (the newest
    sample is in the window) and down only after the load stayed lower for the delay.
    """
    config = service.config
    window = config.look_back + config.scale_down_delay
    peak = max((s.load for s in service.load if s.at >= now - window), default=0)
    target = math.ceil(peak / config.target_concurrency)
    if service.demand_since is not None:
        target = max(target, 1)  # scale from zero: a request is waiting
    return max(config.min_instances, min(config.max_instances, target))


@dataclass
class _Plan:
    """Working state while deciding one service."""

    service: ServiceSnapshot
    now: float
    backoff: Backoff
    actions: list[Action] = field(default_factory=list)
    submits: list[tuple[int, Submit]] = field(default_factory=list)  # (priority, submit)

    @property
    def name(self) -> str:
        return self.service.config.name

    def cancel(self, job: JobView, reason: str) -> None:
        self.actions.append(Cancel(self.name, job.job_id, reason))

    def warn(self, message: str, job: JobView | None = None) -> None:
        self.actions.append(Warn(self.name, message, job.job_id if job else None))


def _update_backoff(plan: _Plan) -> None:
    backoff, config = plan.backoff, plan.service.config
    for job in plan.service.jobs:
        started = job.ready_since
        if backoff.failures and started is not None and started >= (backoff.last_failure or 0):
            backoff = Backoff()  # a start succeeded after the last failure
    for lost in plan.service.lost:
        if not lost.was_ready and not lost.cancelled:
            backoff = after_failure(backoff, plan.now, config)
    plan.backoff = backoff


def _triage(plan: _Plan, threshold: int) -> list[JobView]:
    """Cancel jobs that are done for; return the ones that keep serving or starting."""
    config, now = plan.service.config, plan.now
    keep: list[JobView] = []
    for job in plan.service.jobs:
        if job.cancelled:
            continue
        left = job.info.time_left_s
        if job.running_since is not None and job.info.state in REQUEUED_STATES:
            # Preempted with PreemptMode=REQUEUE (or requeued by an admin): Slurm holds it
            # back for minutes (BeginTime) under the same id, folder and stale endpoint.
            plan.cancel(job, "requeued by Slurm after it ran: a new job replaces it")
            continue
        if job.draining:
            if job.in_flight == 0 or (left is not None and left <= DRAIN_DEADLINE_S):
                plan.cancel(job, "drained")
            continue
        if job.operator_drain == OPERATOR_NOW or (job.operator_drain and not job.ready):
            _drain_now(plan, job)
        elif job.ready and job.health_failures >= threshold:
            _retire_unhealthy(plan, job)
        elif not job.ready and job.running_since is not None:
            if now - job.running_since > config.startup_timeout:
                plan.cancel(job, f"not ready {config.startup_timeout:.0f}s after it started")
                plan.backoff = after_failure(plan.backoff, now, config)
            else:
                keep.append(job)
        else:
            if not job.info.running and now - job.first_seen > config.startup_timeout:
                waited = now - job.first_seen
                reason = job.info.reason or "no reason given"
                plan.warn(f"pending for {waited:.0f}s ({reason})", job)
            keep.append(job)
    return keep


def _retire_unhealthy(plan: _Plan, job: JobView) -> None:
    """Cancel a job that fails its health checks, or drain it while it still has requests
    in flight: a preempted server stops listening first, then finishes what it has, and a
    cancel now (a second SIGTERM) would cut those off. Drained jobs are cancelled once idle.
    """
    reason = f"unhealthy: {job.health_failures} failed health checks in a row"
    if job.in_flight > 0:
        plan.actions.append(Drain(plan.name, job.job_id, reason))
    else:
        plan.cancel(job, reason)


def _drain_now(plan: _Plan, job: JobView) -> None:
    """An operator drain that waits for no replacement (a job not serving yet has nothing
    to hand over): the scaling rules replace the instance."""
    if job.ready:
        plan.actions.append(Drain(plan.name, job.job_id, "operator: now"))
    else:
        plan.cancel(job, "operator: drained before it served")


def operator_turn(jobs: Sequence[JobView]) -> str | None:
    """The job whose operator hand-over runs now: one per service at a time, oldest first.

    While an operator-drained job is still draining (or stopping), the next one waits.
    """
    marked = sorted(
        (job for job in jobs if job.operator_drain == OPERATOR_REPLACE),
        key=lambda job: (job.first_seen, job.job_id),
    )
    if any(job.draining or job.cancelled for job in marked):
        return None
    return next((job.job_id for job in marked if job.ready), None)


def _renew(plan: _Plan, live: list[JobView]) -> tuple[list[JobView], set[str]]:
    """Drain old jobs whose replacement is ready and submit replacements that are due.

    Returns the instances and the ids of jobs whose renewal is under way.
    """
    by_id = {job.job_id: job for job in live}
    renewing = {job.replaces: job for job in live if job.replaces in by_id}
    turn = operator_turn(plan.service.jobs)
    instances: list[JobView] = []
    for job in live:
        if job.replaces in by_id:
            continue  # counted with the job it replaces
        successor = renewing.get(job.job_id)
        if successor is not None and successor.ready:
            reason = f"replaced by {successor.job_id}"
            reason = f"operator: {reason}" if job.operator_drain else reason
            plan.actions.append(Drain(plan.name, job.job_id, reason))
            instances.append(successor)
            continue
        instances.append(job)
        left = job.info.time_left_s
        due = left is not None and left <= plan.service.config.renewal_lead
        if job.ready and successor is None and (due or job.job_id == turn):
            why = "renewal" if due else "operator drain"
            where = choose(plan.service, floor=not preemptible(plan.service, job))
            plan.submits.append((0, Submit(plan.name, why, job.job_id, where)))
    renewal = set(renewing) | {job.job_id for job in renewing.values()}
    return instances, {job_id for job_id in renewal if job_id is not None}


def _scale(plan: _Plan, instances: list[JobView], renewing: set[str]) -> None:
    config = plan.service.config
    want = desired_instances(plan.service, plan.now)
    have = len(instances)
    if have < want and queued_behind(plan.service, plan.now):
        want = max(have, config.min_instances)  # more would only queue behind the pending
    # The floor is held by instances that are not preemptible; without placements, all.
    floor = floor_count(plan.service, instances)
    missing = max(0, config.min_instances - floor)
    for _ in range(missing):
        where = choose(plan.service, floor=True)
        plan.submits.append((0, Submit(plan.name, "min_instances", placement=where)))
    for _ in range(max(0, want - have - missing)):
        where = choose(plan.service, floor=False)
        plan.submits.append((1, Submit(plan.name, "load", placement=where)))
    if have <= want:
        return
    _scale_down(plan, instances, renewing, have - want, floor)


def _scale_down(
    plan: _Plan, instances: list[JobView], renewing: set[str], excess: int, floor: int
) -> None:
    """Stop `excess` instances, least useful first, keeping min_instances on the floor."""
    spare = max(0, floor - plan.service.config.min_instances)  # floor ones it may take
    victims: list[JobView] = []
    for job in _victims(plan.service.jobs, instances, renewing):
        if len(victims) == excess:
            break
        if not preemptible(plan.service, job):
            if spare == 0:
                continue
            spare -= 1
        victims.append(job)
    for job in victims:
        stop = Drain if job.ready else Cancel
        plan.actions.append(stop(plan.name, job.job_id, "scale down"))
        plan.submits = [(p, sub) for p, sub in plan.submits if sub.replaces != job.job_id]
        for successor in plan.service.jobs:  # an operator hand-over that scale-down ends
            if successor.replaces == job.job_id and not (successor.cancelled or successor.ready):
                plan.cancel(successor, f"scale down: {job.job_id} drains instead")


def _move_pending(plan: _Plan, live: list[JobView]) -> None:
    """Pending jobs Slurm expects much later than another placement would start a new
    one: submit there (once per job) and cancel the pending one once that is queued."""
    stopped = {a.job_id for a in plan.actions if isinstance(a, Cancel | Drain)}
    jobs = [job for job in live if job.job_id not in stopped]
    floors = sorted((j for j in jobs if not preemptible(plan.service, j)), key=_is_running)
    spare = max(0, len(floors) - plan.service.config.min_instances)  # pending ones first
    floor = {job.job_id for job in floors[spare:]}
    for move in pending_moves(plan.service, jobs, floor):
        job, expected = move.job, move.job.expected_start or move.start
        reason = (
            f"moved from {job.job_id}: predicted start in {move.placement} "
            f"{expected - move.start:.0f}s sooner"
        )
        submit = Submit(plan.name, reason, job.replaces, move.placement, moves=job.job_id)
        plan.submits.append((0, submit))


def _is_running(job: JobView) -> bool:
    return job.info.running


def _victims(jobs: Sequence[JobView], instances: list[JobView], renew: set[str]) -> list[JobView]:
    """Least useful first: jobs an operator asked to drain (a hand-over then is moot), not
    yet ready (newest first), the ready with least time left; not those being renewed."""
    pending = {j.replaces for j in jobs if j.replaces and not j.ready and not j.cancelled}
    marked = [j for j in instances if j.ready and j.operator_drain]
    marked.sort(key=lambda j: j.job_id in pending)
    idle = sorted((j for j in instances if not j.ready), key=lambda j: -j.first_seen)
    ready = sorted(
        (j for j in instances if j.ready and j.job_id not in renew and not j.operator_drain),
        key=lambda j: j.info.time_left_s if j.info.time_left_s is not None else math.inf,
    )
    return [*marked, *idle, *ready]


def _plan_service(service: ServiceSnapshot, now: float, threshold: int) -> _Plan:
    plan = _Plan(service=service, now=now, backoff=service.backoff)
    _update_backoff(plan)
    live = _triage(plan, threshold)
    instances, renewing = _renew(plan, live)
    _scale(plan, instances, renewing)
    _move_pending(plan, live)
    if plan.submits and plan.backoff.blocks(now):
        until = plan.backoff.not_before or now
        plan.warn(
            f"{plan.backoff.failures} failed start(s) in a row: next submission in "
            f"{until - now:.0f}s"
        )
        plan.submits.clear()
    return plan


def gpus_in_use(snapshot: Snapshot) -> int:
    """GPUs held by all our jobs still in Slurm, draining and cancelled ones included.

    Orphans (jobs of services removed from the config) count one GPU each: their real
    size is unknown, and they are being cancelled.
    """
    used = sum(gpus_per_job(s.config) * len(s.jobs) for s in snapshot.services)
    return used + len(snapshot.orphans)


def _admit(snapshot: Snapshot, plans: Sequence[_Plan]) -> list[Action]:
    """Admit the wanted submissions by priority within max_total_gpus."""
    used = gpus_in_use(snapshot)
    wanted = [(prio, index, submit) for index, p in enumerate(plans) for prio, submit in p.submits]
    admitted: list[Action] = []
    for _prio, index, submit in sorted(wanted, key=lambda item: (item[0], item[1])):
        need = gpus_per_job(plans[index].service.config)
        cap = snapshot.max_total_gpus
        if cap is not None and used + need > cap:
            if submit.moves is None:  # a move is an option, not a need: no warning
                warning = f"max_total_gpus {cap} reached: not submitted"
                admitted.append(Warn(submit.service, warning))
            continue
        used += need
        admitted.append(submit)
        if submit.moves is not None:  # the moved job's GPUs count until it is gone
            reason = f"moved to {submit.placement}"
            admitted.append(Cancel(submit.service, submit.moves, reason))
    return admitted


def _retire_orphans(orphans: Sequence[JobView]) -> list[Action]:
    """Jobs of services no longer configured (a reload removed them): the router sends
    them nothing new; they are drained, then cancelled once idle (or out of time)."""
    actions: list[Action] = []
    for job in orphans:
        left = job.info.time_left_s
        busy = job.in_flight > 0 and (left is None or left > DRAIN_DEADLINE_S)
        if job.cancelled:
            continue
        if not busy:
            actions.append(Cancel(job.info.service, job.job_id, "service no longer configured"))
        elif not job.draining:
            actions.append(Drain(job.info.service, job.job_id, "service no longer configured"))
    return actions


def decide(snapshot: Snapshot, now: float) -> Decision:
    """What to do now; actions come in the order the agent should carry them out."""
    plans = [_plan_service(s, now, snapshot.health_failures) for s in snapshot.services]
    actions = _retire_orphans(snapshot.orphans)
    for plan in plans:
        actions.extend(plan.actions)
    actions.extend(_admit(snapshot, plans))
    backoff = {plan.name: plan.backoff for plan in plans}
    return Decision(actions=tuple(actions), backoff=backoff)
