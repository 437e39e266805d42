"""The systemd units in containers/systemd/ pass `systemd-analyze verify` without a
warning (an unknown key is only a warning there, so stderr must be empty too)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "containers" / "systemd"
SAIA = Path(sys.executable).with_name("saia")


def verify(unit: Path, *options: str, env: dict[str, str] | None = None) -> str:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing: python -m saia.sandbox.packages --for test")
    done = subprocess.run(
        ["systemd-analyze", *options, "verify", str(unit)],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_the_hub_system_unit_verifies(tmp_path: Path) -> None:
    # verify wants ExecStart to exist: point the documented venv at this one
    text = (UNITS / "saia-hub.service").read_text()
    assert "/opt/saia/venv/bin/saia hub serve -c /etc/saia/hub.yaml" in text
    unit = tmp_path / "saia-hub.service"
    unit.write_text(text.replace("/opt/saia/venv/bin/saia", str(SAIA)))
    assert verify(unit) == ""


def test_the_agent_user_unit_verifies(tmp_path: Path) -> None:
    home, runtime = tmp_path / "home", tmp_path / "run"
    (home / "saia" / "venv" / "bin").mkdir(parents=True)
    (home / "saia" / "venv" / "bin" / "saia").symlink_to(SAIA)
    runtime.mkdir(mode=0o700)
    env = dict(os.environ, HOME=str(home), XDG_RUNTIME_DIR=str(runtime))
    assert verify(UNITS / "saia-agent.service", "--user", env=env) == ""
