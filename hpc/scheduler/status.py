"""The agent's status snapshot (`<state_dir>/status.json`) and its rendering for operators.

The agent rewrites the file atomically after every loop; `saia hpc status` reads it and
shows its age, so an agent that died (or hangs) is visible as a stale snapshot.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from hpc.jobs.system import write_atomic

if TYPE_CHECKING:
    from collections.abc import Sequence

    from hpc.config import ServiceConfig
    from hpc.jobs.system import JobInfo
    from hpc.registry import BackendRegistry
    from hpc.scheduler.live import LiveState

STATUS_FILE = "status.json"
DRAIN_WAIT_WARN = 60.0  # seconds a drain's replacement may pend before status says so
VERSION = 1


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    service: str
    state: str
    endpoint: str | None
    ready: bool
    draining: bool
    cancelled: bool
    time_left_s: int | None
    reason: str = ""
    health: str = ""
    # The backend's own figures from its last /metrics read; None: unknown (not ready yet,
    # or the read failed: see metrics).
    running: int | None = None
    waiting: int | None = None
    kv_cache_usage: float | None = None  # fraction 0..1
    metrics: str = ""  # why the last /metrics read gave no figures
    operator_drain: str = ""  # an operator asked to drain it: "replace" or "now"
    drain_reason: str = ""
    placement: str = ""  # the service's placement it is in ("" without placements, or none)


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    model_id: str
    ready: int
    starting: int
    draining: int
    in_flight: int
    queued: int
    rate_per_s: float
    min_instances: int
    max_instances: int
    warnings: list[str] = field(default_factory=list)
    running: int = 0  # sum over the service's jobs with figures
    waiting: int = 0
    kv_cache_usage: float | None = None  # mean over the jobs with figures
    load: int = 0  # the scaling signal: max(in_flight + queued, running + waiting)
    oldest_wait_s: float = 0.0  # how long the longest-waiting request in the router's queue waited


@dataclass(frozen=True)
class AgentStatus:
    agent_id: str
    pid: int
    written_at: float
    poll_interval: float
    stopped: bool = False
    services: list[ServiceStatus] = field(default_factory=list)
    jobs: list[JobStatus] = field(default_factory=list)
    error: str = ""
    reloaded_at: float | None = None  # when the agent last handled a config reload
    reload_error: str = ""  # why that reload failed ("" when it succeeded)

    def to_json(self) -> str:
        return json.dumps({"version": VERSION, **asdict(self)}, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> AgentStatus:
        data = json.loads(text)
        if not isinstance(data, dict) or data.pop("version", None) != VERSION:
            raise ValueError("not a saia status file of a known version")
        services = [ServiceStatus(**s) for s in data.pop("services")]
        jobs = [JobStatus(**j) for j in data.pop("jobs")]
        return cls(services=services, jobs=jobs, **data)


class StatusError(Exception):
    """No usable status file; str() is one line."""


def write_status(state_dir: Path, status: AgentStatus) -> None:
    write_atomic(state_dir / STATUS_FILE, status.to_json(), mode=0o644)


def read_status(state_dir: Path) -> AgentStatus:
    path = state_dir / STATUS_FILE
    try:
        return AgentStatus.from_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StatusError(f"{path}: no status yet (has the agent ever run here?)") from None
    except OSError as error:
        raise StatusError(f"{path}: cannot read: {error.strerror or error}") from None
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise StatusError(f"{path}: unreadable status: {error}") from None


def age_note(status: AgentStatus, now: float) -> tuple[str, bool]:
    """How old the snapshot is, and whether that means the agent is not running."""
    age = max(0.0, now - status.written_at)
    if status.stopped:
        return f"agent {status.agent_id} stopped {age:.0f}s ago", True
    stale = age > max(3 * status.poll_interval, 30.0)
    note = f"agent {status.agent_id} (pid {status.pid}), updated {age:.0f}s ago"
    return (note + ": STALE, is the agent running?" if stale else note), stale


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def _services_table(status: AgentStatus) -> Table:
    table = Table(title="services", title_justify="left")
    table.add_column("model")  # the model id clients ask for; the jobs table names services
    columns = ("min..max", "ready", "starting", "draining", "in flight", "queued", "oldest wait")
    for column in (*columns, "req/s"):
        table.add_column(column, justify="right")
    for s in status.services:
        table.add_row(
            s.model_id,
            f"{s.min_instances}..{s.max_instances}",
            str(s.ready),
            str(s.starting),
            str(s.draining),
            str(s.in_flight),
            str(s.queued),
            f"{s.oldest_wait_s:.1f} s" if s.queued else "-",
            f"{s.rate_per_s:.2f}",
        )
    return table


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.0f}%"


def _figure(value: int | None) -> str:
    return "-" if value is None else str(value)


def _load_table(status: AgentStatus) -> Table:
    """The backends' own figures (vLLM /metrics) per job, each service's total, and the
    load the scaling policy uses: max(in flight + queued, running + waiting)."""
    table = Table(title="backend load (vLLM /metrics)", title_justify="left")
    table.add_column("model")
    table.add_column("job")
    for column in ("running", "waiting", "kv cache", "scaling load"):
        table.add_column(column, justify="right")
    for s in status.services:
        for j in status.jobs:
            shown = j.running is not None or ((j.ready or j.draining) and not j.cancelled)
            if j.service == s.name and shown:
                row = (_figure(j.running), _figure(j.waiting), _percent(j.kv_cache_usage))
                table.add_row(s.model_id, j.job_id, *row, "")
        total = (str(s.running), str(s.waiting), _percent(s.kv_cache_usage), str(s.load))
        table.add_row(s.model_id, "total", *total, style="bold")
    return table


def _warnings(status: AgentStatus) -> list[RenderableType]:
    return [
        Text(f"warning: {s.model_id}: {message}", style="yellow")
        for s in status.services
        for message in s.warnings
    ]


def _jobs_table(status: AgentStatus, age: float) -> Table:
    table = Table(title="jobs", title_justify="left")
    for column in ("job", "service", "state", "endpoint", "serving", "time left", "note"):
        table.add_column(column)
    for j in status.jobs:
        left = None if j.time_left_s is None else j.time_left_s - age
        note = j.drain_reason if j.draining else j.health or j.reason or j.metrics
        state = f"{j.state} in {j.placement}" if j.placement else j.state
        table.add_row(
            j.job_id, j.service, state, j.endpoint or "-", serving(j), _duration(left), note
        )
    return table


def serving(job: JobStatus) -> str:
    """The job's part in serving, as `status` shows it."""
    if job.cancelled:
        return "cancelled"
    if job.draining:
        return "draining (operator)" if job.operator_drain else "draining"
    if job.operator_drain:
        return "ready, drain requested" if job.ready else "drain requested"
    if job.ready:
        return "ready"
    return "pending" if job.state == "PENDING" else "starting"


def render_status(status: AgentStatus, now: float | None = None) -> RenderableType:
    now = time.time() if now is None else now
    note, bad = age_note(status, now)
    parts: list[RenderableType] = [Text(note, style="bold red" if bad else "bold")]
    if status.error:
        parts.append(Text(f"last error: {status.error}", style="red"))
    age = max(0.0, now - status.written_at)
    parts += [_services_table(status), *_warnings(status), _jobs_table(status, age)]
    if status.services:
        parts.append(_load_table(status))
    return Group(*parts)


def status_dict(status: AgentStatus, now: float) -> dict[str, Any]:
    """The snapshot plus its age, for `saia hpc status --json`."""
    _note, stale = age_note(status, now)
    return {**asdict(status), "age_s": round(now - status.written_at, 3), "stale": stale}


def _job_status(live: LiveState, job_id: str) -> JobStatus | None:
    info, record = live.info(job_id), live.jobs.get(job_id)
    if info is None or record is None:
        return None
    endpoint = live.endpoints.get(job_id)
    health = live.health.get(job_id)
    load = health.load
    return JobStatus(
        job_id=job_id,
        service=record.service,
        state=info.state,
        endpoint=f"{endpoint.host}:{endpoint.port}" if endpoint else None,
        ready=live.health.serving(job_id),
        draining=record.draining,
        cancelled=record.cancelled,
        time_left_s=info.time_left_s,
        reason=info.reason,
        health=health.detail,
        running=load.running if load else None,
        waiting=load.waiting if load else None,
        kv_cache_usage=load.kv_cache_usage if load else None,
        metrics=health.load_problem,
        operator_drain=record.operator_drain,
        drain_reason=record.drain_reason,
        placement=_placement(live, info),
    )


def _placement(live: LiveState, info: JobInfo) -> str:
    from hpc.scheduler.placement import placement_of  # the agent's side only

    service = live.services.get(info.service)
    return (placement_of(service, info) or "") if service is not None else ""


def drain_waits(live: LiveState, service: str, now: float) -> list[str]:
    """Operator drains whose replacement has been pending for DRAIN_WAIT_WARN: the
    hand-over waits for it however long Slurm takes (a full partition), so say so."""
    found = []
    for job_id, record in live.jobs.items():
        if record.replaces is None or live.jobs.get(record.replaces) is None:
            continue
        old, info = live.jobs[record.replaces], live.info(job_id)
        waited = now - record.first_seen
        pending = info is not None and not info.running and waited >= DRAIN_WAIT_WARN
        if record.service == service and old.operator_drain and pending:
            assert info is not None
            found.append(
                f"drain of job {record.replaces} waits for its replacement {job_id}, "
                f"pending for {waited:.0f}s ({info.reason or 'no reason given'}); "
                f"withdraw it with saia hpc drain {record.replaces} --cancel"
            )
    return found


def _service_status(
    live: LiveState,
    registry: BackendRegistry,
    service: ServiceConfig,
    jobs: list[JobStatus],
    now: float,
) -> ServiceStatus:
    mine = [j for j in jobs if j.service == service.name and not j.cancelled]
    load = registry.load(service.name, time.monotonic())
    samples = live.loads(service.name)
    kv = [j.kv_cache_usage for j in mine if j.kv_cache_usage is not None]
    return ServiceStatus(
        name=service.name,
        model_id=service.model_id,
        ready=sum(j.ready and not j.draining for j in mine),
        starting=sum(not j.ready and not j.draining for j in mine),
        draining=sum(j.draining for j in mine),
        in_flight=load.in_flight,
        queued=load.queued,
        rate_per_s=load.rate_per_s,
        min_instances=service.min_instances,
        max_instances=service.max_instances,
        warnings=[*live.warnings(service.name), *drain_waits(live, service.name, now)],
        running=sum(j.running or 0 for j in mine),
        waiting=sum(j.waiting or 0 for j in mine),
        kv_cache_usage=sum(kv) / len(kv) if kv else None,
        load=samples[-1].load if samples else load.in_flight + load.queued,
        oldest_wait_s=round(registry.oldest_wait(service.name, time.monotonic()), 3),
    )


def build_status(
    live: LiveState,
    registry: BackendRegistry,
    now: float,
    stopped: bool = False,
    problems: Sequence[str] = (),
) -> AgentStatus:
    """What `saia hpc status` shows, read from the agent's live state and the router's
    counts (nothing here changes either); `problems` of the agent's other tasks (writing
    its state, pruning job folders) join the live state's error."""
    jobs = [j for j in (_job_status(live, job_id) for job_id in live.jobs) if j]
    services = [_service_status(live, registry, s, jobs, now) for s in live.config.services]
    return AgentStatus(
        agent_id=live.agent_id,
        pid=os.getpid(),
        written_at=now,
        poll_interval=live.config.poll_interval,
        stopped=stopped,
        services=services,
        jobs=jobs,
        error="; ".join(e for e in (live.error, *problems) if e),
        reloaded_at=live.reloaded_at,
        reload_error=live.reload_error,
    )


JOB_ID = re.compile(r"^(?:[0-9]{1,15}(?:_[0-9]{1,9})?|local-[0-9]{1,15})$")


def job_log(state_dir: Path, job_id: str) -> Path:
    """The log of one of this state dir's jobs; ValueError (one line) otherwise.

    The id is checked against Slurm's and the local executor's forms before it touches a
    path, so `saia hpc logs ../../etc/passwd` cannot leave the state dir.
    """
    if not JOB_ID.match(job_id):
        raise ValueError(f"{job_id!r} is not a job id (a Slurm job id or local-N)")
    jobs = state_dir / "jobs"
    for candidate in (jobs / f"{job_id}.log", jobs / job_id / "job.log"):
        if candidate.is_file():
            return candidate
    raise ValueError(f"no log of job {job_id} under {jobs}")


def tail(path: Path, lines: int, block: int = 65536) -> tuple[bytes, int]:
    """The last `lines` lines of a file and the offset where the file ends."""
    with path.open("rb") as handle:
        end = handle.seek(0, os.SEEK_END)
        start, data = end, b""
        while start > 0 and data.count(b"\n") <= lines:
            start = max(0, start - block)
            handle.seek(start)
            data = handle.read(end - start)
    kept = data.splitlines(keepends=True)[-lines:] if lines else []
    return b"".join(kept), end
