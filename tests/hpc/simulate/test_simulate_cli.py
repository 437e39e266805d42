"""`saia hpc simulate`: a CSV trace through both policies, the JSON line, the PNG, errors."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from hpc.cli import hpc

KEYS = ("wait_p50_s", "wait_p95_s", "wait_p99_s", "rejected", "gpu_hours", "felt_p95_s", "failed")


def test_csv_trace_json_line_and_plot(tmp_path: Path) -> None:
    trace = tmp_path / "day.csv"
    rows = [f"{t},,200,50" for t in range(0, 1800, 3)]
    trace.write_text("time,service,prompt_tokens,output_tokens\n" + "\n".join(rows) + "\n")
    png = tmp_path / "out.png"
    args = ["simulate", "--trace", str(trace), "--seed", "3", "--json", "--plot", str(png)]
    result = CliRunner().invoke(hpc, args)
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output.strip().splitlines()[-1])
    assert figures["trace"] == "day"
    for policy in ("policy", "baseline"):
        assert all(key in figures[policy] for key in KEYS)
        assert figures[policy]["requests"] == len(rows)
        assert figures[policy]["gpu_hours"] > 0
    assert "| day | policy |" in result.output
    assert png.read_bytes().startswith(b"\x89PNG")


def test_generator_without_plot_and_a_duration() -> None:
    args = ["simulate", "--trace", "bursty", "--duration", "30m", "--no-plot", "--json"]
    result = CliRunner().invoke(hpc, args)
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output.strip().splitlines()[-1])
    assert figures["duration_s"] == 1800
    assert "plot:" not in result.output


def test_bad_trace_and_bad_config_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("time,service,prompt_tokens,output_tokens\n1,m,lots,2\n")
    result = CliRunner().invoke(hpc, ["simulate", "--trace", str(bad), "--no-plot"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: {bad}: line 2: expected {KEYS_CSV}"]
    config = tmp_path / "sim.yaml"
    config.write_text("queues: {gpu: {median: 1h, p95: 1m}}\n")
    result = CliRunner().invoke(hpc, ["simulate", "-c", str(config), "--no-plot"])
    assert result.exit_code == 2
    assert "p95 must be >= median" in result.output
    assert "Traceback" not in result.output


KEYS_CSV = "time,service,prompt_tokens,output_tokens"


def test_fixed_placement_and_its_errors() -> None:
    config = str(Path(__file__).parents[3] / "docs" / "simulator-two-partitions.yaml")
    base = ["simulate", "-c", config, "--trace", "poisson", "--duration", "20m", "--no-plot"]
    result = CliRunner().invoke(hpc, [*base, "--json", "--fixed", "short"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output.strip().splitlines()[-1])
    assert figures["fixed"] == "short" and figures["policy"]["requests"] > 0
    result = CliRunner().invoke(hpc, [*base, "--fixed", "nowhere"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: --fixed nowhere: no service has a placement of that name"
    ]
