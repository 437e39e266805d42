"""One simulation of both policies over the same trace: the agent's `decide` and the baseline."""

from __future__ import annotations

from pathlib import Path

from hpc.scheduler.policy import decide
from hpc.simulate.baseline import COLD_REJECT_AFTER_S, baseline_decide
from hpc.simulate.config import SimConfig
from hpc.simulate.engine import Policy, Run, simulate
from hpc.simulate.trace import DEFAULT_DURATION, GENERATORS, Request, generate, read_csv

POLICY = Policy("policy", decide)
# The reference system's 503 carries no Retry-After: its clients use their own back-off.
BASELINE = Policy(
    "baseline", baseline_decide, cold_reject_after=COLD_REJECT_AFTER_S, sends_retry_after=False
)


def compare(config: SimConfig, trace: list[Request], seed: int, duration: float) -> list[Run]:
    """The agent's policy and the baseline on the same trace and the same random streams."""
    return [
        simulate(config, trace, POLICY, seed, duration),
        simulate(config.for_baseline(), trace, BASELINE, seed, duration),
    ]


def trace_duration(spec: str, trace: list[Request], asked: float | None) -> float:
    """The run's length: as asked, else the generator's default or the last arrival."""
    if asked is not None:
        return asked
    if spec in GENERATORS:
        return DEFAULT_DURATION[spec]
    return max((request.at for request in trace), default=0.0)


def load_trace(spec: str, config: SimConfig, duration: float | None, seed: int) -> list[Request]:
    """A generator's trace (`poisson`, `diurnal`, `bursty`) for the first service, or a CSV
    file's; TraceError when the file cannot be read."""
    first = config.services[0].name
    if spec in GENERATORS:
        return generate(spec, first, duration, seed)
    trace = read_csv(Path(spec), first)
    if duration is not None:
        trace = [request for request in trace if request.at < duration]
    return trace
