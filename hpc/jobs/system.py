"""What the agent knows about a job, and the one interface to whatever runs jobs.

`JobSystem` has two implementations: the Slurm command-line tools (the default and the
tested path) and a local executor that runs the same job script as a subprocess.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

ACTIVE_STATES = frozenset(
    {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "RESIZING", "REQUEUED"}
)


@dataclass(frozen=True)
class JobTag:
    """How a job is recognised as ours: job name `<prefix>-<service>` and a comment."""

    prefix: str
    agent_id: str

    def job_name(self, service: str) -> str:
        return f"{self.prefix}-{service}"

    @property
    def comment(self) -> str:
        return f"saia-agent:{self.agent_id}"


@dataclass(frozen=True)
class JobInfo:
    job_id: str
    service: str
    state: str
    time_limit_s: int | None
    time_left_s: int | None
    start_time: float | None
    submit_time: float | None
    nodes: tuple[str, ...]
    reason: str

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def running(self) -> bool:
        return self.state == "RUNNING"


@dataclass(frozen=True)
class Submission:
    service: str
    script: str
    job_name: str
    comment: str
    log_path: Path
    environment: dict[str, str]


class JobSystem(Protocol):
    """Submits, lists and cancels this agent's jobs; never touches anyone else's."""

    async def submit(self, submission: Submission) -> str:
        """Queue the job and return its id."""
        ...

    async def list_jobs(self) -> list[JobInfo]:
        """This agent's active jobs (by tag)."""
        ...

    async def cancel(self, job_id: str) -> None:
        """Ask the job to stop (SIGTERM first, through its --signal handler)."""
        ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class Endpoint:
    """The rendezvous record a job writes once its server listens."""

    job_id: str
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def job_dir(state_dir: Path, job_id: str) -> Path:
    return state_dir / "jobs" / job_id


def read_endpoint(state_dir: Path, job_id: str) -> Endpoint | None:
    """The job's endpoint file, or None while it has not written one (or wrote garbage)."""
    path = job_dir(state_dir, job_id) / "endpoint.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        host, port = str(data["host"]), int(data["port"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not host or not 0 < port < 65536:
        return None
    return Endpoint(job_id=job_id, host=host, port=port)


def write_atomic(path: Path, text: str, mode: int = 0o600) -> None:
    """Write via a temporary file and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
