"""The pure routing policy, without mocks."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from hpc.router.policy import (
    RETRY_MAX,
    ServiceCounts,
    next_trial,
    pick_backend,
    queue_is_full,
    retry_delay,
    service_demand,
    service_status,
)


@dataclass
class B:
    job_id: str
    in_flight: int
    failures: int = 0
    retry_at: float = 0.0


def test_least_outstanding_wins() -> None:
    assert pick_backend([B("1", 3), B("2", 1), B("3", 2)], 0, now=10) == "2"


def test_ties_rotate_fairly() -> None:
    backends = [B("a", 1), B("b", 1), B("c", 5)]
    picks = Counter(pick_backend(backends, turn, now=10) for turn in range(10))
    assert picks == {"a": 5, "b": 5}


def test_a_failed_backend_waits_out_its_backoff() -> None:
    failed = B("a", 0, failures=1, retry_at=11.0)
    assert pick_backend([failed, B("b", 9)], 0, now=10) == "b"
    assert pick_backend([failed], 0, now=10) is None
    assert next_trial([failed, B("b", 9)], now=10) == 11.0
    assert pick_backend([failed], 0, now=11) == "a"  # its trial
    assert next_trial([failed], now=11) is None
    assert pick_backend([], 3, now=10) is None
    assert next_trial([], now=10) is None


def test_backoff_doubles_up_to_a_bound() -> None:
    delays = [retry_delay(n) for n in range(1, 12)]
    assert delays[:3] == [0.25, 0.5, 1.0]
    assert delays == sorted(delays)
    assert delays[-1] == RETRY_MAX
    assert retry_delay(10**6) == RETRY_MAX


def snap(**kw: int | bool) -> ServiceCounts:
    base: dict[str, int | bool] = dict(
        ready=0, starting=0, in_flight=0, queued=0, demand_waiting=False, target_concurrency=8
    )
    base.update(kw)
    return ServiceCounts(**base)  # type: ignore[arg-type]


def test_status() -> None:
    assert service_status(snap(ready=1, starting=1)) == "ready"
    assert service_status(snap(starting=1)) == "loading"
    assert service_status(snap(queued=2)) == "loading"
    assert service_status(snap(demand_waiting=True)) == "loading"
    assert service_status(snap()) == "offline"


def test_demand() -> None:
    assert service_demand(snap(ready=2, in_flight=8)) == 0.5
    assert service_demand(snap(ready=1, in_flight=8, queued=4)) == 1.5
    assert service_demand(snap(queued=4)) == 0.5
    assert service_demand(snap()) == 0.0


def test_queue_bound() -> None:
    assert not queue_is_full(3, 4)
    assert queue_is_full(4, 4)
    assert queue_is_full(0, 0)
