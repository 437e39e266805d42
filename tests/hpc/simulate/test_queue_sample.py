"""Queue waits recorded on a cluster (sacct / squeue --start output) as the queue model."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from click.testing import CliRunner

from hpc.cli import hpc
from hpc.simulate.config import ConfigError, load_sim_config
from hpc.simulate.queue_sample import parse_waits

SAMPLE = """\
# sacct -X -n -P -a -o Partition,QOS,Submit,Start
gpu|normal|2026-11-02T10:00:00|2026-11-02T10:02:00
gpu|normal|2026-11-02T11:00:00|2026-11-02T11:30:00
gpu|long|2026-11-02T12:00:00|2026-11-02T14:00:00

gpu|normal|2026-11-02T13:00:00|Unknown
short||2026-11-02T13:00:00|2026-11-02T13:00:10
"""


def test_waits_per_partition_and_qos() -> None:
    waits = parse_waits(SAMPLE, "s.txt")
    assert waits["gpu/normal"] == [120.0, 1800.0]  # the job not started yet is skipped
    assert waits["gpu/long"] == [7200.0]
    assert sorted(waits["gpu"]) == [120.0, 1800.0, 7200.0]
    assert waits["short"] == [10.0]


def test_a_bad_sample_line_is_one_line() -> None:
    with pytest.raises(
        ConfigError, match=r"^s.txt: line 2: expected partition\|qos\|submit\|start$"
    ):
        parse_waits(
            "gpu|normal|2026-11-02T10:00:00|2026-11-02T10:02:00\ngpu|yesterday|x|y\n", "s.txt"
        )
    with pytest.raises(ConfigError, match="no job with a known submit and start"):
        parse_waits("gpu|normal|2026-11-02T10:00:00|Unknown\n", "s.txt")


def test_a_config_draws_from_the_recorded_waits(tmp_path: Path) -> None:
    (tmp_path / "waits.txt").write_text(SAMPLE)
    config_path = tmp_path / "sim.yaml"
    config_path.write_text("queue_sample: waits.txt\nqueues: {short: {gpus: 2}}\n")
    config = load_sim_config(config_path)
    short = config.queues["short"]
    assert short.gpus == 2 and short.waits == [10.0]  # the config's limit, the sample's waits
    rng = random.Random(1)
    drawn = {config.queues["gpu/normal"].sample(rng) for _ in range(50)}
    assert drawn == {120.0, 1800.0}


def test_a_missing_sample_file_is_one_line_on_the_cli(tmp_path: Path) -> None:
    config_path = tmp_path / "sim.yaml"
    config_path.write_text("queue_sample: nowhere.txt\n")
    result = CliRunner().invoke(hpc, ["simulate", "-c", str(config_path), "--no-plot"])
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: ") and "nowhere.txt: cannot read" in line
