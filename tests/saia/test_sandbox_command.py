"""`saia sandbox slurm up|status|down`: a cluster that outlives the command that started
it, and is stopped by the pids it saved."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from saia.sandbox.slurm import unavailable

pytestmark = pytest.mark.slurm
SAIA = str(Path(sys.executable).with_name("saia"))


def saia(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SAIA, "sandbox", "slurm", *args], capture_output=True, text=True, timeout=120
    )


def alive(pid: int) -> bool:
    """Running, not a zombie (whoever inherited the daemon may reap it late)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def test_up_outlives_the_command_and_down_stops_it(tmp_path: Path) -> None:
    if (reason := unavailable()) is not None:
        pytest.fail(reason)
    root = tmp_path / "cluster"
    started = saia("up", "--root", str(root), "--cpus", "2")
    try:
        assert started.returncode == 0, started.stderr
        assert f"slurm_conf: {root}/etc/slurm.conf" in started.stdout
        pids = json.loads((root / "sandbox.json").read_text())["pids"]
        assert len(pids) == 3 and all(alive(pid) for pid in pids)
        again = saia("up", "--root", str(root))
        assert again.returncode == 1 and "already runs" in again.stderr
        assert saia("status", "--root", str(root)).returncode == 0
        env = dict(os.environ, SLURM_CONF=str(root / "etc" / "slurm.conf"))
        job = subprocess.run(
            ["sbatch", "--parsable", "--partition=gpu", "--gres=gpu:1", "--wrap=sleep 300"],
            env=env, capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        assert job.stdout.strip().isdigit()
    finally:
        stopped = saia("down", "--root", str(root))
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped (3 daemons)" in stopped.stdout
    assert not any(alive(pid) for pid in pids)
    assert saia("status", "--root", str(root)).returncode == 1
    assert "was started" in saia("down", "--root", str(root)).stderr
