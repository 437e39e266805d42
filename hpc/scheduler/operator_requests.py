"""Operator requests to the running agent: files in `<state_dir>/requests/`.

`saia hpc drain` and `saia hpc reload` write one small JSON file each (atomically, named
from a validated job id or a hash, so nothing can leave the directory); the agent reads and
removes them in its observe step. A signal only nudges the agent to look at once: the file
is the request, so nothing is lost when the nudge is (or when the agent restarts).

The leader writes its pid to `<state_dir>/agent.pid`; a command trusts it only while the
leader lock is held, so a stale file never makes it signal an unrelated process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from hpc.jobs.system import write_atomic
from hpc.scheduler.leader import LOCK_FILE
from hpc.scheduler.status import JOB_ID

log = logging.getLogger(__name__)

REQUESTS_DIR = "requests"
PID_FILE = "agent.pid"
RELOAD_FILE = "reload.json"
WAKE_SIGNAL = signal.SIGUSR1  # "look at the requests now"
RELOAD_SIGNAL = signal.SIGHUP  # "re-read the config file"


class RequestError(Exception):
    """A request that cannot be made; str() is one line for the operator."""


@dataclass(frozen=True)
class DrainRequest:
    """Drain one job (`job_id`) or every job of a service one by one (`service`)."""

    job_id: str | None = None
    service: str | None = None
    now: bool = False
    withdraw: bool = False  # take back a drain of `job_id` that has not started draining


@dataclass(frozen=True)
class ReloadRequest:
    pass


OperatorRequest = DrainRequest | ReloadRequest


def requests_dir(state_dir: Path) -> Path:
    return state_dir / REQUESTS_DIR


def check_job_id(job_id: str) -> str:
    if not JOB_ID.match(job_id):
        raise RequestError(f"{job_id!r} is not a job id (a Slurm job id or local-N)")
    return job_id


def write_drain(state_dir: Path, request: DrainRequest) -> Path:
    """Write the drain request file; the agent picks it up at its next loop."""
    if request.job_id is not None:
        name = f"drain-{check_job_id(request.job_id)}.json"
        body = {"job": request.job_id, "now": request.now, "withdraw": request.withdraw}
    elif request.service:
        digest = hashlib.sha256(request.service.encode()).hexdigest()[:16]
        name = f"drain-service-{digest}.json"  # service names may hold '/' or ':'
        body = {"service": request.service, "now": request.now}
    else:
        raise RequestError("a drain request names a job or a service")
    path = requests_dir(state_dir) / name
    write_atomic(path, json.dumps(body) + "\n")
    return path


def write_reload(state_dir: Path) -> Path:
    path = requests_dir(state_dir) / RELOAD_FILE
    write_atomic(path, json.dumps({"reload": True}) + "\n")
    return path


def parse_request(text: str) -> OperatorRequest:
    """One request file's content; ValueError when it is not a request."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    if data == {"reload": True}:
        return ReloadRequest()
    now = data.get("now", False)
    if not isinstance(now, bool):
        raise ValueError("'now' must be true or false")
    job, service, withdraw = data.get("job"), data.get("service"), data.get("withdraw", False)
    if not isinstance(withdraw, bool):
        raise ValueError("'withdraw' must be true or false")
    if isinstance(job, str) and service is None:
        return DrainRequest(job_id=check_job_id(job), now=now, withdraw=withdraw)
    if isinstance(service, str) and service and job is None:
        return DrainRequest(service=service, now=now)
    raise ValueError("a drain request names one job or one service")


def take_requests(state_dir: Path) -> list[OperatorRequest]:
    """Read and remove the pending requests, oldest first; bad files are logged and removed."""
    folder = requests_dir(state_dir)
    try:
        entries = [p for p in folder.iterdir() if p.suffix == ".json" and p.name[0] != "."]
    except FileNotFoundError:
        return []
    requests: list[OperatorRequest] = []
    for path in sorted(entries, key=_age):
        try:
            requests.append(parse_request(path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, ValueError, RequestError) as error:
            log.error("ignoring operator request %s: %s", path.name, error)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return requests


def _age(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


# -- the leader's pid ---------------------------------------------------------------
def write_pid(state_dir: Path) -> None:
    write_atomic(state_dir / PID_FILE, f"{os.getpid()}\n", mode=0o644)


def remove_pid(state_dir: Path) -> None:
    path = state_dir / PID_FILE
    with contextlib.suppress(OSError, ValueError):
        if int(path.read_text(encoding="ascii")) == os.getpid():
            path.unlink()


def leader_pid(state_dir: Path) -> int:
    """The running leader's pid; RequestError when no agent leads this state dir."""
    lock = FileLock(state_dir / LOCK_FILE, thread_local=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        pass  # held: an agent leads
    except OSError as error:
        raise RequestError(f"{state_dir}: cannot check the agent lock: {error}") from None
    else:
        lock.release(force=True)
        raise RequestError(f"no agent is running on {state_dir}")
    try:
        return int((state_dir / PID_FILE).read_text(encoding="ascii"))
    except (OSError, ValueError):
        raise RequestError(f"{state_dir / PID_FILE}: no usable pid of the agent") from None


def nudge(state_dir: Path, signum: signal.Signals) -> int:
    """Signal the running leader; its pid. RequestError when there is none to signal."""
    pid = leader_pid(state_dir)
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        raise RequestError(f"the agent (pid {pid}) is gone") from None
    except PermissionError:
        raise RequestError(f"not allowed to signal the agent (pid {pid})") from None
    return pid
