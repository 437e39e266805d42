"""What every sandbox shares: its error, a free loopback port, stopping a child by its pid.

A sandbox starts real programs (munged, slurmd, sshd, postgres, ...) for the tests and the
demo, and must stop exactly those: always by the pid of the child it started, never by name.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType
from typing import Self

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


class SandboxError(RuntimeError):
    """A sandbox cannot be started or used; the message says why (and what to fix)."""


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def stop_process(
    process: subprocess.Popen[bytes],
    grace: float,
    *,
    stop_signal: signal.Signals = signal.SIGTERM,
    kill_wait: float | None = None,
) -> int:
    """`stop_signal` to this one process, SIGKILL after `grace` seconds; its exit code.

    `kill_wait` bounds the wait after SIGKILL (default: `grace`).
    """
    if process.poll() is None:
        process.send_signal(stop_signal)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            log.warning("process %d did not stop in %g s: killing it", process.pid, grace)
            process.kill()
            process.wait(timeout=grace if kill_wait is None else kill_wait)
    return process.returncode


def children_of(pid: int) -> list[int]:
    """The pids of the processes whose parent is `pid` (from /proc), in ascending order."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text(encoding="ascii", errors="replace")
        except OSError:  # gone meanwhile
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and fields[1] == str(pid):
            found.append(int(entry.name))
    return sorted(found)


class Sandbox(ABC):
    """`with SomeSandbox(...) as sandbox:` starts it and stops it on the way out."""

    @abstractmethod
    def start(self) -> object: ...

    @abstractmethod
    def stop(self) -> None: ...

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
