"""What an operator met on the hub side (issue 18): the key table, the database file's
mode and a forgotten `-c`."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from hub.cli import hub


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "hub.yaml"
    path.write_text(
        f"data_dir: {tmp_path / 'data'}\n"
        "upstreams:\n  p: {kind: openai, base_url: 'http://127.0.0.1:9/v1'}\n"
        "models:\n  - {id: m1, upstream: p}\n"
    )
    return path


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(hub, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_keys_list_has_a_header_expiry_and_limits(tmp_path: Path) -> None:
    config = str(write_config(tmp_path))
    code, _, err = run(
        "keys", "create", "-c", config, "--name", "lab key", "--user", "ann",
        "--expires", "30d", "--requests-per-minute", "60", "--tokens-per-day", "1000",
    )  # fmt: skip
    assert code == 0, err
    assert run("keys", "create", "-c", config, "--name", "ops", "--admin")[0] == 0
    code, out, _ = run("keys", "list", "-c", config)
    header, *rows = out.splitlines()
    assert header.split() == [
        "id",
        "state",
        "owner",
        "models",
        "expires",
        "(UTC)",
        "limits",
        "name",
    ]
    (lab,) = [row for row in rows if "lab key" in row]
    assert "rpm=60" in lab and "tpd=1000" in lab and "never" not in lab
    (ops,) = [row for row in rows if "ops" in row]
    assert "never" in ops and "(admin)" in ops
    assert header.index("limits") == lab.index("rpm=60")  # columns line up


def test_the_sqlite_file_is_created_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        assert run("db", "upgrade", "-c", str(write_config(tmp_path)))[0] == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o700
    for name in os.listdir(tmp_path / "data"):  # hub.db and its -wal/-shm files
        assert stat.S_IMODE((tmp_path / "data" / name).stat().st_mode) == 0o600, name


@pytest.mark.parametrize("args", [("keys", "list"), ("usage", "--since", "2026-01-01")])
def test_a_missing_default_config_says_how_to_give_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: tuple[str, ...]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SAIA_HUB_CONFIG", raising=False)
    code, _, err = run(*args)
    assert code == 2
    assert err == "hub.yaml: cannot read: no such file (give -c FILE or set SAIA_HUB_CONFIG)\n"
    monkeypatch.setenv("SAIA_HUB_CONFIG", str(write_config(tmp_path)))
    assert run(*args)[0] == 0
