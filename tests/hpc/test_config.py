from pathlib import Path

import pytest

from hpc.config import ConfigError, load_config, parse_config
from saia.base.durations import format_slurm_time, parse_duration, parse_slurm_time


def test_minimal_config_gets_defaults(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("state_dir: state\nservices:\n  - name: llama\n    model: /models/llama\n")
    config = load_config(path)
    assert config.state_dir == (tmp_path / "state").resolve()
    service = config.services[0]
    assert service.model_id == "llama"
    assert service.resources.time_limit_seconds == 3600
    assert config.service("llama") is service


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"services": []}, "state_dir: Field required"),
        (
            {
                "state_dir": "/s",
                "services": [{"name": "a", "model": "m", "min_instances": 2, "max_instances": 1}],
            },
            "services[0]: max_instances must be >= min_instances",
        ),
        (
            {
                "state_dir": "/s",
                "services": [{"name": "a", "model": "m", "resources": {"time_limit": "1:2:3:4"}}],
            },
            "services[0].resources.time_limit: invalid Slurm time '1:2:3:4'",
        ),
        (
            {"state_dir": "/s", "services": [{"name": "a;rm", "model": "m"}]},
            "services[0].name: use letters",
        ),
        (
            {
                "state_dir": "/s",
                "services": [
                    {"name": "a", "model": "m", "resources": {"extra_sbatch": ["--job-name=x"]}}
                ],
            },
            "--job-name is set by the agent itself",
        ),
        ({"state_dir": "/s", "bogus": 1}, "bogus: Extra inputs are not permitted"),
    ],
)
def test_errors_are_one_line_each_with_key(data: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, "agent.yaml")
    lines = str(caught.value).splitlines()
    assert any(line.startswith("agent.yaml: ") and expected in line for line in lines), lines


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("state_dir: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+: not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("5", 300),
        ("05:30", 330),
        ("1:00:00", 3600),
        ("2-00:00:00", 172800),
        ("1-2", 93600),
        ("1-02:03", 93780),
        ("3-04:05:06", 273906),
        ("UNLIMITED", None),
        ("INFINITE", None),
    ],
)
def test_parse_slurm_time(text: str, seconds: int | None) -> None:
    assert parse_slurm_time(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "1:2:3:4", "-1", "1-", "1:99", "1-2:3:4:5"])
def test_parse_slurm_time_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_slurm_time(text)


def test_format_round_trips() -> None:
    for seconds in (0, 59, 3600, 93784, 10 * 86400 + 1):
        assert parse_slurm_time(format_slurm_time(seconds)) == seconds


def test_parse_duration() -> None:
    assert parse_duration("30s") == 30
    assert parse_duration("10m") == 600
    assert parse_duration("1.5h") == 5400
    assert parse_duration("0:10:00") == 600
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration("soon")
