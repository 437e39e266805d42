"""`python -m bench` is wired up: its pieces import, and a run at tiny sizes (real chain,
about 40 s) ends with one JSON line holding every figure the issue asks for. A test of
wiring, not of speed: it asserts no figure's value."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from saia.sandbox.sshd import SSHD

ROOT = Path(__file__).resolve().parents[2]
KEYS = {
    "overhead_p50_ms", "overhead_p99_ms", "c64_p99_over_p50", "rps_ratio_c64",
    "chain_cpu_ms_per_request", "hub_cpu_ms_per_request", "ttft_overhead_p50_ms",
    "stream_tps_ratio", "streams_1000_errors", "streams_5000_errors",
    "hub_rss_mb_5000_streams", "agent_rss_mb_5000_streams", "soak_rss_growth_pct",
    "soak_errors", "soak_fd_growth",
}  # fmt: skip


def test_pieces_import() -> None:
    from bench import chain_load, chain_meter, chain_phases, chain_setup

    assert chain_phases.ROUTES == ("direct", "openai", "chain")
    assert {chain_load.SaiaClient, chain_meter.CpuMeter, chain_setup.Chain}
    assert __import__("bench.__main__").__name__ == "bench"


@pytest.mark.ssh
@pytest.mark.skipif(not SSHD.exists(), reason="needs OpenSSH's sshd")
def test_tiny_run_prints_the_json_line(tmp_path: Path) -> None:
    output = tmp_path / "latest.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--tiny", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    line = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(line) >= KEYS
    assert json.loads(output.read_text())["summary"] == line
