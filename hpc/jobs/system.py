"""What the agent knows about a job, and the one interface to whatever runs jobs.

`JobSystem` has two implementations: the Slurm command-line tools (the default and the
tested path) and a local executor that runs the same job script as a subprocess.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import ssl
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from saia.base.pinned_tls import fingerprint, pinned_context

log = logging.getLogger(__name__)
_refused: set[str] = set()
# endpoint.json and api_key are a few dozen bytes; more is not a file a job wrote.
MAX_PRIVATE_FILE = 4096
TLS_CERTIFICATE = "tls/cert.pem"  # a job's own certificate (slurm/common.sh), in its dir
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
    # Where Slurm queued it ("" when none or not known): which of the service's placements
    # the job is in, also for a job an earlier agent submitted.
    partition: str = ""
    qos: str = ""
    reservation: str = ""

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
    placement: str = ""  # the service's placement it is for (ServiceConfig.candidates)
    partition: str = ""  # what the script asks Slurm for ("" when nothing)
    qos: str = ""
    reservation: str = ""


@dataclass(frozen=True)
class StartEstimate:
    """When Slurm would start a job of this shape, and where (`sbatch --test-only`)."""

    start: float
    nodes: tuple[str, ...]
    partition: str


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

    async def expected_starts(self, job_ids: Sequence[str]) -> dict[str, float | None]:
        """When each of these pending jobs should start (epoch s), as the scheduler
        estimates it; None for a job without an estimate, absent for one no longer pending."""
        ...

    async def test_start(self, submission: Submission) -> StartEstimate:
        """When (and where) the scheduler would start this job if it were submitted now;
        nothing is queued. Raises when it cannot say."""
        ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class Rendezvous:
    """The rendezvous record a job writes once its server listens; `certificate` (PEM) is
    the job's own TLS certificate when it serves https (the one the agent pins)."""

    job_id: str
    host: str
    port: int
    certificate: str | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.certificate else "http"
        return f"{scheme}://{self.host}:{self.port}"

    def tls(self) -> ssl.SSLContext | None:
        """The client context that trusts this job's certificate alone (None: plain)."""
        return pinned_context(self.certificate) if self.certificate else None


def job_dir(state_dir: Path, job_id: str) -> Path:
    return state_dir / "jobs" / job_id


def private_dir(path: Path) -> Path:
    """Create `path` (and parents) if missing and make it 0700: the state and jobs dirs
    hold per-job keys and endpoints, which no other user of the machine may read or plant."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if stat.S_IMODE(path.stat().st_mode) != 0o700:
        path.chmod(0o700)
    return path


def read_private(path: Path) -> str | None:
    """The text of a file only this account could have written (a regular file, not a
    link, owned by us, mode 0600); None for anything else, so a file planted or left
    readable by someone else is never trusted."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:  # missing (not written yet), or a symbolic link
        return None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        mode = stat.S_IMODE(info.st_mode)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or mode != 0o600:
            if str(path) not in _refused:  # once per file: the agent reads these every poll
                _refused.add(str(path))
                log.warning(
                    "ignoring %s: owner uid %d, mode %o (only our own 0600 files count)",
                    path,
                    info.st_uid,
                    mode,
                )
            return None
        try:
            return handle.read(MAX_PRIVATE_FILE).decode("utf-8")
        except (OSError, UnicodeDecodeError):
            return None


def read_endpoint(state_dir: Path, job_id: str) -> Rendezvous | None:
    """The job's endpoint file, or None while it has not written one (or wrote garbage,
    or the file is not 0600 and ours: see `read_private`)."""
    text = read_private(job_dir(state_dir, job_id) / "endpoint.json")
    if text is None:
        return None
    try:
        data = json.loads(text)
        host, port = str(data["host"]), int(data["port"])
        scheme = data.get("scheme", "http")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    if not host or not 0 < port < 65536 or scheme not in ("http", "https"):
        return None
    certificate = None
    if scheme == "https":
        certificate = read_certificate(state_dir, job_id, data.get("tls_sha256"))
        if certificate is None:
            return None  # never a plain fallback for a job that serves TLS
    return Rendezvous(job_id=job_id, host=host, port=port, certificate=certificate)


def read_certificate(state_dir: Path, job_id: str, sha256: object) -> str | None:
    """The job's certificate (`<job dir>/tls/cert.pem`, ours and 0600) if its SHA-256 is
    the one endpoint.json names; a mismatch is logged once per job."""
    path = job_dir(state_dir, job_id) / TLS_CERTIFICATE
    pem = read_private(path)
    if pem is None or not isinstance(sha256, str):
        return None
    try:
        matches = fingerprint(pem) == sha256.lower()
    except ValueError:
        matches = False
    if not matches and str(path) not in _refused:
        _refused.add(str(path))
        log.warning("job %s: %s is not the certificate its endpoint.json names", job_id, path)
    return pem if matches else None


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


def stable_token(path: Path, prefix: str = "") -> str:
    """The token kept in `path`, made (prefix + 12 hex digits) and written on first use, so
    it stays the same across restarts; a file that holds no plain token is replaced."""
    try:
        existing = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        existing = ""
    if existing.isalnum():
        return existing
    new = prefix + secrets.token_hex(6)
    write_atomic(path, new + "\n")
    return new
