"""Clients that retry a 503 and the user's felt wait: the pure retry rule and whole runs."""

from __future__ import annotations

import random

import pytest

from hpc.simulate.client import ClientModel, next_attempt
from hpc.simulate.engine import simulate
from hpc.simulate.plot import wait_p95_by_bin
from hpc.simulate.report import summarize
from hpc.simulate.run import BASELINE, POLICY
from tests.hpc.simulate.test_simulate import requests, service, world

STEADY = ClientModel(jitter=0)


def attempt(client: ClientModel, n: int, retry_after: float | None, now: float = 100.0) -> float:
    at = next_attempt(
        client, random.Random(1), origin=100.0, now=now, attempt=n, retry_after_s=retry_after
    )
    assert at is not None
    return at - now


def test_retry_after_is_followed_else_the_clients_own_back_off() -> None:
    assert attempt(STEADY, 0, 42.0) == 42.0
    assert [attempt(STEADY, n, None) for n in range(7)] == [2, 4, 8, 16, 32, 60, 60]
    spread = {attempt(ClientModel(jitter=0.1), 0, 100.0) for _ in range(3)}
    assert all(90.0 <= wait <= 110.0 for wait in spread)


def test_the_client_gives_up_or_never_retries() -> None:
    rng = random.Random(1)
    late = next_attempt(STEADY, rng, origin=0.0, now=590.0, attempt=3, retry_after_s=30.0)
    assert late is None  # 620 s after the first attempt: past give_up (600 s)
    never = ClientModel(retry=False)
    assert next_attempt(never, rng, origin=0.0, now=5.0, attempt=0, retry_after_s=1.0) is None


def test_cold_baseline_user_waits_through_retries() -> None:
    # queue 60 s + load 30 s; the baseline's router 503s after 5 s while cold, its
    # clients back off 2, 4, 8, ... s and are served once the job is ready
    config = world(service(min_instances=0), client={"jitter": 0})
    run = simulate(config, requests([10.0]), BASELINE, seed=1, duration=60)
    summary = summarize(run)
    assert summary.requests == 1 and summary.served == 1
    assert summary.attempts == summary.rejected + 1 >= 5
    assert summary.retried == 1 and summary.failed == 0
    assert summary.wait_p50_s < 5.0  # the served attempt hardly waited...
    assert summary.felt_p50_s >= 90.0  # ...its user waited for the job to start and load
    assert all(f.origin == 10.0 for f in run.flights)


def test_a_client_that_gives_up_is_failed_at_its_give_up() -> None:
    config = world(service(min_instances=0), client={"give_up": "20s", "jitter": 0})
    summary = summarize(simulate(config, requests([10.0]), BASELINE, seed=1, duration=60))
    assert summary.served == 0 and summary.failed == 1
    assert summary.felt_p50_s == 20.0


def test_policy_router_sends_the_predicted_wait_as_retry_after() -> None:
    # the policy's router gives up after queue_timeout 10 s on a cold service; its 503
    # carries the predicted wait: Slurm's start (t=70) + the agent's default load time
    # (180 s, no job has loaded yet) = t=250, so the single retry is served at once then
    config = world(service(min_instances=0), queue_timeout="10s", client={"jitter": 0})
    run = simulate(config, requests([10.0]), POLICY, seed=1, duration=60)
    summary = summarize(run)
    assert summary.rejected == 1 and summary.served == 1
    assert [f.request.at for f in run.flights] == [10.0, 250.0]
    assert summary.felt_p50_s == pytest.approx(240.0)
    assert summary.wait_p50_s == 0.0


def test_the_plot_bins_felt_waits_by_the_first_attempt() -> None:
    config = world(service(min_instances=0), client={"jitter": 0})
    run = simulate(config, requests([10.0]), BASELINE, seed=1, duration=60)
    at, waits, rejected, felt = wait_p95_by_bin(run)
    assert at[0] == 0.0 and felt[0] >= 90.0  # the request first sent in the first 5 minutes
    assert max(waits) < 5.0 and sum(rejected) == summarize(run).rejected
