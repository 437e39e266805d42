"""One simulation of both policies over the same trace: the agent's `decide` and the baseline."""

from __future__ import annotations

from hpc.scheduler.policy import decide
from hpc.simulate.baseline import COLD_REJECT_AFTER_S, baseline_decide
from hpc.simulate.config import SimConfig
from hpc.simulate.engine import Policy, Run, simulate
from hpc.simulate.trace import Request

POLICY = Policy("policy", decide)
BASELINE = Policy("baseline", baseline_decide, cold_reject_after=COLD_REJECT_AFTER_S)


def compare(config: SimConfig, trace: list[Request], seed: int, duration: float) -> list[Run]:
    """The agent's policy and the baseline on the same trace and the same random streams."""
    return [simulate(config, trace, policy, seed, duration) for policy in (POLICY, BASELINE)]


def trace_duration(trace: list[Request], asked: float | None) -> float:
    """The run's length: as asked, else up to the last arrival."""
    if asked is not None:
        return asked
    return max((request.at for request in trace), default=0.0)
