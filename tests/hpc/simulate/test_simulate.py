"""The fleet simulator: traces, the baseline policy and whole simulated runs (pure, fast)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from hpc.config import ServiceConfig
from hpc.jobs.system import JobInfo
from hpc.scheduler.policy import JobView, LoadSample, ServiceSnapshot, Snapshot, Submit
from hpc.simulate.baseline import baseline_decide, baseline_target
from hpc.simulate.config import (
    ConfigError,
    QueueModel,
    SimConfig,
    load_sim_config,
    parse_sim_config,
)
from hpc.simulate.engine import simulate
from hpc.simulate.report import as_json, percentile, summarize, table
from hpc.simulate.run import BASELINE, POLICY, compare
from hpc.simulate.trace import Request, TraceError, generate, read_csv, write_csv


def service(**overrides: object) -> ServiceConfig:
    data: dict[str, object] = {
        "name": "m",
        "model": "x",
        "min_instances": 1,
        "max_instances": 4,
        "target_concurrency": 4,
        "resources": {"partition": "gpu", "time_limit": "1:00:00"},
        "renewal_lead": "10m",
    }
    data.update(overrides)
    return ServiceConfig.model_validate(data)


def world(svc: ServiceConfig, **overrides: object) -> SimConfig:
    data: dict[str, object] = {
        "services": [svc.model_dump()],
        "queues": {"gpu": {"median": "60s", "p95": "60s"}},  # every job waits exactly 60 s
        "instance": {svc.name: {"load_time": "30s", "concurrency": 4, "tokens_per_s": 10}},
        "preemptions_per_gpu_hour": 0,
        "estimate_error": 0,  # Slurm's predictions exact unless a test says otherwise
    }
    data.update(overrides)
    return parse_sim_config(data)


def requests(times: list[float], output_tokens: int = 100) -> list[Request]:
    return [Request(t, "m", 10, output_tokens) for t in times]


# -- pure parts -------------------------------------------------------------------------
def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 95) == 95.0
    assert percentile(values, 100) == 100.0
    assert percentile([], 95) == 0.0


def test_generators_are_seeded_and_keep_their_rate() -> None:
    one = generate("poisson", "m", 3600, seed=7)
    assert one == generate("poisson", "m", 3600, seed=7)
    assert one != generate("poisson", "m", 3600, seed=8)
    assert 1.4 < len(one) / 3600 < 1.6  # 1.5 requests/s on average
    day = generate("diurnal", "m", 86400, seed=1)
    night = sum(1 for r in day if r.at < 3600)
    noon = sum(1 for r in day if 11.5 * 3600 <= r.at < 12.5 * 3600)
    assert noon > 20 * night


def test_bursty_has_bursts() -> None:
    trace = generate("bursty", "m", 6 * 3600, seed=3)
    per_minute = [0] * 360
    for r in trace:
        per_minute[int(r.at // 60)] += 1
    assert max(per_minute) > 5 * sorted(per_minute)[180]  # peaks far above the median minute


def test_csv_round_trip_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "trace.csv"
    trace = [Request(2.5, "m", 10, 20), Request(1.0, "other", 5, 7)]
    write_csv(path, trace)
    assert read_csv(path, "m") == sorted(trace, key=lambda r: r.at)
    path.write_text("time,service,prompt_tokens,output_tokens\n1,,3,4\nx,m,1,1\n")
    with pytest.raises(TraceError, match="line 3"):
        read_csv(path, "m")
    path.write_text("when,what\n")
    with pytest.raises(TraceError, match="line 1"):
        read_csv(path, "m")


def test_queue_model_median() -> None:
    model = QueueModel(median=100.0, p95=400.0)
    rng = random.Random(1)
    waits = sorted(model.sample(rng) for _ in range(4001))
    assert 90 < waits[2000] < 110
    assert 330 < waits[3800] < 480


def test_sim_config_errors_are_one_line_per_problem() -> None:
    with pytest.raises(ConfigError) as error:
        parse_sim_config({"queues": {"gpu": {"median": "10m", "p95": "1m"}}, "bogus": 1})
    lines = str(error.value).splitlines()
    assert len(lines) == 2
    assert any("p95 must be >= median" in line for line in lines)


# -- the baseline on constructed snapshots ----------------------------------------------
def job(job_id: str) -> JobView:
    info = JobInfo(job_id, "m", "PENDING", 3600, 3600, None, 0.0, (), "Priority")
    return JobView(info=info, first_seen=0.0)


def snap(loads: list[tuple[float, int]], jobs: int = 0, cap: int | None = None) -> Snapshot:
    svc = ServiceSnapshot(
        config=service(),
        jobs=tuple(job(str(i)) for i in range(jobs)),
        load=tuple(LoadSample(at, n) for at, n in loads),
    )
    return Snapshot(services=(svc,), max_total_gpus=cap)


def test_baseline_scales_on_the_60s_average_not_the_peak() -> None:
    # 0 in flight for 50 s, then a spike of 40: the average is 80/13, target ceil(6.2/4) = 2
    # (the agent's policy follows the peak: 40/4 = 10, capped at max_instances 4)
    loads = [(float(t), 0) for t in range(40, 95, 5)] + [(95.0, 40), (100.0, 40)]
    assert baseline_target(snap(loads).services[0], 100.0) == 2
    old = [(10.0, 100)]  # older than 60 s: ignored
    assert baseline_target(snap(old).services[0], 100.0) == 1  # min_instances


def test_baseline_counts_pending_jobs_and_respects_the_cap() -> None:
    loads = [(100.0, 16)]  # target 4
    assert len(baseline_decide(snap(loads, jobs=1), 100.0).actions) == 3
    assert baseline_decide(snap(loads, jobs=4), 100.0).actions == ()
    capped = baseline_decide(snap(loads, jobs=1, cap=2), 100.0).actions
    assert capped == (Submit("m", "baseline: moving average"),)


# -- whole runs -------------------------------------------------------------------------
def test_warm_service_serves_at_once() -> None:
    run = simulate(world(service()), requests([10.0, 20.0]), POLICY, seed=1, duration=60)
    summary = summarize(run)
    assert summary.served == 2
    assert summary.wait_p99_s == 0.0
    assert 0 <= summary.ttft_p95_s < 0.01  # 10 prompt tokens at 4000 tokens/s


def test_cold_service_policy_waits_for_a_job_baseline_rejects() -> None:
    cold = world(service(min_instances=0))
    trace = requests([10.0])
    by_policy = summarize(simulate(cold, trace, POLICY, seed=1, duration=60))
    by_baseline = summarize(simulate(cold, trace, BASELINE, seed=1, duration=60))
    assert by_policy.served == 1
    assert by_policy.wait_p50_s == pytest.approx(90.0)  # queue 60 s + load 30 s
    assert by_baseline.rejected >= 1  # 503 after 5 s, and again on each retry while cold
    assert by_baseline.served == 1  # a retry found the job ready
    assert by_baseline.felt_p50_s >= 90.0 > by_baseline.wait_p50_s


def test_policy_renews_before_the_limit_baseline_drops_requests() -> None:
    # one request every 10 s for 1.5 h across the 1 h limit of the first job
    trace = requests([float(t) for t in range(0, 5400, 10)], output_tokens=50)
    config = world(service())
    policy = simulate(config, trace, POLICY, seed=1, duration=5400)
    baseline = simulate(config, trace, BASELINE, seed=1, duration=5400)
    assert any(j.replaces == "1" for j in policy.jobs)  # the real decide() renewed job 1
    assert summarize(policy).rejected == summarize(policy).interrupted == 0
    cut = summarize(baseline)
    assert cut.rejected + cut.interrupted > 0  # a gap at the time limit


def test_compare_is_repeatable_and_json_has_both_policies() -> None:
    config = world(service(), preemptions_per_gpu_hour=0.5)
    trace = generate("bursty", "m", 3600, seed=2)
    first = [summarize(r) for r in compare(config, trace, seed=5, duration=3600)]
    again = [summarize(r) for r in compare(config, trace, seed=5, duration=3600)]
    assert first == again
    line = as_json(first, trace="bursty")
    keys = ("wait_p50_s", "wait_p95_s", "wait_p99_s", "rejected", "gpu_hours")
    for key in (*keys, "felt_p50_s", "felt_p95_s", "felt_p99_s", "failed", "attempts"):
        assert f'"{key}"' in line
    assert '"policy": {' in line and '"baseline": {' in line
    assert table(first).count("\n") == 3


def test_a_burst_never_holds_more_than_the_gpu_cap() -> None:
    config = world(service(max_instances=8), max_total_gpus=6)
    trace = generate("bursty", "m", 2 * 3600, seed=4)
    run = simulate(config, trace, POLICY, seed=1, duration=2 * 3600)
    assert max(t.held + t.pending for t in run.ticks) <= 6
    assert max(t.ready for t in run.ticks) >= 4  # it did scale up for the bursts


def test_the_documented_tuned_config_is_valid() -> None:
    path = Path(__file__).parents[3] / "docs" / "simulator-tuned.yaml"
    config = load_sim_config(path)
    assert config.max_queue == 4096
    assert config.services[0].target_concurrency == 12
    assert config.for_baseline().services[0].target_concurrency == 8
    warm = load_sim_config(path.with_name("simulator-warm.yaml"))
    assert warm.services[0].min_instances == 4
    assert warm.for_baseline().services[0].min_instances == 1
    two = load_sim_config(path.with_name("simulator-two-partitions.yaml"))
    assert [p.name for p in two.services[0].candidates] == ["gpu", "short"]


def test_the_baseline_runs_with_its_own_knobs() -> None:
    config = world(service(min_instances=2), baseline={"min_instances": 0, "target_concurrency": 9})
    assert config.for_baseline().services[0].min_instances == 0
    assert config.for_baseline().services[0].target_concurrency == 9
    assert config.services[0].min_instances == 2  # the policy's own
    policy, baseline = compare(config, [], seed=1, duration=60)
    assert len(policy.jobs) == 2  # warm start: min_instances
    assert baseline.jobs == []
