"""The processes a program started, directly or not, and stopping them by pid (Linux).

`saia demo` starts sshd, whose relay may start a new agent (in its own session) when the
first one died; Slurm's job steps double-fork away from slurmd. Marked as a child
subreaper (`become_subreaper`), the demo inherits every such orphan among its
descendants, so it can find them (`descendants`) and stop exactly those, by pid, without
looking at any process outside its own tree.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import time
from pathlib import Path

from saia.sandbox.process import children_of

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36
POLL = 0.1


def become_subreaper() -> bool:
    """Orphaned descendants become this process's children instead of init's."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def descendants(pid: int) -> list[int]:
    """Every live (not zombie) process below `pid`, parents before their children."""
    found: list[int] = []
    queue = [pid]
    while queue:
        for child in children_of(queue.pop(0)):
            if not _zombie(child):
                found.append(child)
            queue.append(child)
    return found


def argv_of(pid: int) -> list[str]:
    """The process's argv ([] when it is gone or a zombie)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def reap(keep: frozenset[int] = frozenset()) -> None:
    """Collect the exit status of inherited children that ended (no zombies left).

    `keep`: children whose status their Popen object collects (reaping them here would
    make Popen report exit code 0).
    """
    for child in children_of(os.getpid()):
        if child not in keep and _zombie(child):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(child, os.WNOHANG)


def stop_pids(
    pids: list[int], grace: float, *, keep: frozenset[int] = frozenset(), kill_wait: float = 5.0
) -> list[int]:
    """SIGTERM each, SIGKILL those left after `grace` seconds; the pids that were killed.

    The pids must not be Popen children (their Popen reaps them): see `reap`.
    """
    _signal(pids, signal.SIGTERM)
    left = _wait_gone(pids, grace, keep)
    if left:
        log.warning("processes %s did not stop in %g s: killing them", left, grace)
        _signal(left, signal.SIGKILL)
        _wait_gone(left, kill_wait, keep)
    return left


def _signal(pids: list[int], signum: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def _wait_gone(pids: list[int], limit_s: float, keep: frozenset[int]) -> list[int]:
    deadline = time.monotonic() + limit_s
    while True:
        reap(keep)
        left = [pid for pid in pids if _alive(pid)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(POLL)


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and not _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return True  # gone counts as dead
    fields = stat.rsplit(")", 1)[-1].split()
    return bool(fields) and fields[0] in ("Z", "X")
