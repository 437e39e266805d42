"""The config-file machinery the agent and the hub share: one line `FILE: KEY: REASON`."""

from __future__ import annotations

from pathlib import Path

import pytest

from saia.base.config_file import ConfigError, Duration, Strict, read_yaml, validate


class Example(Strict):
    directory: Path
    wait: Duration = 5.0


def test_relative_paths_follow_the_file_absolute_ones_stay(tmp_path: Path) -> None:
    source = tmp_path / "etc" / "x.yaml"
    relative = validate(Example, {"directory": "data"}, source, relative_paths=("directory",))
    assert relative.directory == (tmp_path / "etc" / "data").resolve()
    absolute = validate(Example, {"directory": "/srv/x"}, source, relative_paths=("directory",))
    assert absolute.directory == Path("/srv/x")
    untouched = validate(Example, {"directory": "data"}, source)
    assert untouched.directory == Path("data")


def test_without_a_file_relative_paths_follow_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = validate(Example, {"directory": "d"}, relative_paths=("directory",))
    assert config.directory == (tmp_path / "d").resolve()


def test_durations_and_problems_are_one_line_each() -> None:
    assert validate(Example, {"directory": "/d", "wait": "10m"}).wait == 600.0
    with pytest.raises(ConfigError) as raised:
        validate(Example, {"wait": -1, "extra": 1}, "c.yaml")
    assert str(raised.value).splitlines() == [
        "c.yaml: directory: Field required",
        "c.yaml: wait: a duration cannot be negative",
        "c.yaml: extra: Extra inputs are not permitted",
    ]
    with pytest.raises(ConfigError, match=r"^c.yaml: wait: expected a duration"):
        validate(Example, {"directory": "/d", "wait": True}, "c.yaml")
    with pytest.raises(ConfigError, match=r"^c.yaml: \(top level\): expected a mapping"):
        validate(Example, ["a"], "c.yaml")


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing.yaml: cannot read: No such file"):
        read_yaml(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [1, 2\nb: 3\n")
    with pytest.raises(ConfigError) as raised:
        read_yaml(broken)
    assert str(raised.value).startswith(f"{broken}: line ")
    assert "not valid YAML: " in str(raised.value) and "\n" not in str(raised.value)
    (tmp_path / "ok.yaml").write_text("a: 1\n")
    assert read_yaml(tmp_path / "ok.yaml") == {"a": 1}
