"""Figures of a simulated run: waits, time to first token, rejections, GPU-hours, jobs.

Two waits, both kept. `wait_*` is what the router sees: per attempt that was served,
from its arrival to a free slot on a ready instance; rejected attempts (503s) are counted
apart. `felt_*` is what the user sees: per request, from its first attempt until one of
its attempts got a slot, through the client's retries (hpc/simulate/client.py); a request
whose client gave up counts as waiting the client's `give_up` (a lower bound) and in
`failed`. Interrupted requests (their job ended under them) are counted apart in both.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from hpc.simulate.engine import Run


@dataclass(frozen=True)
class Summary:
    policy: str
    requests: int  # of the trace
    attempts: int  # requests and their clients' retries
    served: int
    rejected: int  # 503 answers (attempts)
    rejected_queue_full: int  # of rejected: refused at once, max_queue requests were waiting
    retried: int  # requests served after at least one 503
    failed: int  # requests whose client gave up after 503s
    interrupted: int
    wait_p50_s: float
    wait_p95_s: float
    wait_p99_s: float
    ttft_p95_s: float
    felt_p50_s: float
    felt_p95_s: float
    felt_p99_s: float
    gpu_hours: float
    jobs_submitted: int
    preempted: int
    expired: int  # jobs that ran into their time limit


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank q-th percentile (0 < q <= 100); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def felt_waits(run: Run, give_up: float) -> tuple[list[float], int, int]:
    """Per request: first attempt to a slot (a given-up one counts `give_up`); and how many
    were served after a retry and how many were given up."""
    felt: list[float] = []
    retried = failed = 0
    for f in run.flights:
        if f.started is not None and f.outcome != "rejected":
            felt.append(f.started - f.origin)
            retried += f.attempt > 0
        elif f.gave_up:
            felt.append(give_up)
            failed += 1
    return felt, retried, failed


def summarize(run: Run) -> Summary:
    served = [f for f in run.flights if f.started is not None and f.outcome != "rejected"]
    waits = [f.started - f.request.at for f in served if f.started is not None]
    ttfts = [f.first_token - f.request.at for f in served if f.first_token is not None]
    overflow = sum(1 for f in run.flights if f.outcome == "rejected" and f.finished == f.request.at)
    gpu_seconds = sum(job.gpu_seconds(run.horizon) for job in run.jobs)
    felt, retried, failed = felt_waits(run, run.give_up)
    return Summary(
        policy=run.policy,
        requests=sum(1 for f in run.flights if f.attempt == 0),
        attempts=len(run.flights),
        served=sum(1 for f in run.flights if f.outcome == "done"),
        rejected=sum(1 for f in run.flights if f.outcome == "rejected"),
        rejected_queue_full=overflow,
        retried=retried,
        failed=failed,
        interrupted=sum(1 for f in run.flights if f.outcome == "interrupted"),
        wait_p50_s=round(percentile(waits, 50), 2),
        wait_p95_s=round(percentile(waits, 95), 2),
        wait_p99_s=round(percentile(waits, 99), 2),
        ttft_p95_s=round(percentile(ttfts, 95), 2),
        felt_p50_s=round(percentile(felt, 50), 2),
        felt_p95_s=round(percentile(felt, 95), 2),
        felt_p99_s=round(percentile(felt, 99), 2),
        gpu_hours=round(gpu_seconds / 3600, 2),
        jobs_submitted=len(run.jobs),
        preempted=sum(1 for job in run.jobs if job.end_reason == "preempted"),
        expired=sum(1 for job in run.jobs if job.end_reason == "time limit"),
    )


COLUMNS = (
    ("policy", "policy", "{}"),
    ("requests", "requests", "{}"),
    ("wait_p50_s", "wait p50 s", "{:.2f}"),
    ("wait_p95_s", "wait p95 s", "{:.2f}"),
    ("wait_p99_s", "wait p99 s", "{:.2f}"),
    ("ttft_p95_s", "TTFT p95 s", "{:.2f}"),
    ("felt_p95_s", "felt p95 s", "{:.2f}"),
    ("felt_p99_s", "felt p99 s", "{:.2f}"),
    ("rejected", "rejected", "{}"),
    ("failed", "failed", "{}"),
    ("interrupted", "interrupted", "{}"),
    ("gpu_hours", "GPU-h", "{:.1f}"),
    ("jobs_submitted", "jobs", "{}"),
    ("preempted", "preempted", "{}"),
)


def table(summaries: Sequence[Summary], label: str = "") -> str:
    """A Markdown table, one row per policy (and a trace column when `label` is set)."""
    head = ["trace"] if label else []
    lines = [
        "| " + " | ".join([*head, *(title for _, title, _ in COLUMNS)]) + " |",
        "|" + "---|" * (len(COLUMNS) + len(head)),
    ]
    for summary in summaries:
        values = asdict(summary)
        cells = [label] if label else []
        cells += [fmt.format(values[key]) for key, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def as_json(summaries: Sequence[Summary], **extra: object) -> str:
    """One line: {"trace": ..., "policy": {...}, "baseline": {...}}."""
    data: dict[str, object] = dict(extra)
    for summary in summaries:
        data[summary.policy] = asdict(summary)
    return json.dumps(data, sort_keys=True)
