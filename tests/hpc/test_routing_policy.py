"""The pure routing policy, without mocks."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from hpc.router.policy import (
    ServiceCounts,
    pick_backend,
    queue_is_full,
    service_demand,
    service_status,
)


@dataclass
class B:
    job_id: str
    in_flight: int


def test_least_outstanding_wins() -> None:
    assert pick_backend([B("1", 3), B("2", 1), B("3", 2)], (), 0) == "2"


def test_ties_rotate_fairly() -> None:
    backends = [B("a", 1), B("b", 1), B("c", 5)]
    picks = Counter(pick_backend(backends, (), turn) for turn in range(10))
    assert picks == {"a": 5, "b": 5}


def test_tried_backends_are_excluded() -> None:
    assert pick_backend([B("a", 0), B("b", 9)], {"a"}, 0) == "b"
    assert pick_backend([B("a", 0)], {"a"}, 0) is None
    assert pick_backend([], (), 3) is None


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
