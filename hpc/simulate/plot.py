"""The PNG of a comparison: load, instances and wait over time, one line per policy.

matplotlib is the optional extra `sim` (`pip install 'saia[sim]'`); `PlotUnavailable`
says so when it is missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hpc.simulate.engine import Run
from hpc.simulate.report import percentile

BIN_S = 300.0  # the wait panel: p95 of the requests that arrived in each 5 minutes
COLORS = {"policy": "tab:blue", "baseline": "tab:orange"}


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def wait_p95_by_bin(run: Run) -> tuple[list[float], list[float], list[float], list[float]]:
    """Per 5-minute bin of arrivals: the bin's start (h), p95 wait (s) of the attempts
    that arrived in it, rejected attempts, p95 felt wait (s) of requests first sent in it."""
    waits: dict[int, list[float]] = {}
    felt: dict[int, list[float]] = {}
    rejected: dict[int, int] = {}
    for flight in run.flights:
        index = int(flight.request.at // BIN_S)
        first = int(flight.origin // BIN_S)
        if flight.outcome == "rejected":
            rejected[index] = rejected.get(index, 0) + 1
            if flight.gave_up:
                felt.setdefault(first, []).append(run.give_up)
        elif flight.started is not None:
            waits.setdefault(index, []).append(flight.started - flight.request.at)
            felt.setdefault(first, []).append(flight.started - flight.origin)
    bins = sorted(set(waits) | set(rejected) | set(felt))
    return (
        [b * BIN_S / 3600 for b in bins],
        [percentile(waits.get(b, []), 95) for b in bins],
        [float(rejected.get(b, 0)) for b in bins],
        [percentile(felt.get(b, []), 95) for b in bins],
    )


def plot(runs: Sequence[Run], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, never a window
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("the plot needs matplotlib: pip install 'saia[sim]'") from None
    figure, (load, instances, wait) = plt.subplots(3, 1, sharex=True, figsize=(10, 8))
    rejects = wait.twinx()
    for run in runs:
        color = COLORS.get(run.policy)
        hours = [t.at / 3600 for t in run.ticks]
        load.plot(hours, [t.load for t in run.ticks], color=color, lw=0.8, label=run.policy)
        instances.plot(
            hours, [t.ready for t in run.ticks], color=color, label=f"{run.policy} ready"
        )
        held = [t.held + t.pending for t in run.ticks]
        instances.plot(hours, held, color=color, ls=":", label=f"{run.policy} held + pending")
        at, p95, rejected, felt = wait_p95_by_bin(run)
        wait.plot(at, p95, color=color, label=f"{run.policy} wait p95")
        wait.plot(at, felt, color=color, ls="--", lw=0.8, label=f"{run.policy} felt p95")
        marked = [(a, r) for a, r in zip(at, rejected, strict=True) if r]
        if marked:
            xs, ys = zip(*marked, strict=True)
            rejects.scatter(xs, ys, color=color, marker="x", s=14, label=f"{run.policy} rejected")
    load.set_ylabel("requests in flight\n+ queued")
    instances.set_ylabel("jobs")
    wait.set_ylabel("p95 per 5 min (s)")
    rejects.set_ylabel("rejected per 5 min (x)")
    if rejects.collections:  # a legend only when something was rejected
        rejects.legend(loc="upper left", fontsize=7)
    wait.set_xlabel("hours")
    for axes in (load, instances, wait):
        axes.grid(alpha=0.3)
        axes.legend(loc="upper right", fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
