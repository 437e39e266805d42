"""Readings of other processes from /proc: CPU seconds, resident memory, open files.

CPU time, not wall time, per request: it hardly moves with the other load on the machine.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (0 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def status_kb(pid: int, field: str) -> int:
    """A `kB` field of /proc/<pid>/status (VmRSS now, VmHWM the peak so far); 0 if gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def open_files(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


class CpuMeter:
    """CPU seconds per part (a part is a list of pids), summed over `measure` windows."""

    def __init__(self, parts: Mapping[str, Sequence[int]]) -> None:
        self.parts = {"client": [os.getpid()], **parts}
        self.used: dict[str, float] = dict.fromkeys(self.parts, 0.0)
        self._start: dict[str, float] = {}

    def sample(self) -> dict[str, float]:
        return {name: sum(cpu_seconds(p) for p in pids) for name, pids in self.parts.items()}

    def begin(self) -> None:
        self._start = self.sample()

    def end(self) -> None:
        for name, seconds in self.sample().items():
            self.used[name] += seconds - self._start[name]

    def ms_per_request(self, requests: int) -> dict[str, float]:
        return {name: 1000 * used / max(1, requests) for name, used in self.used.items()}


def percentile(values: Sequence[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")
