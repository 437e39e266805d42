"""`saia hpc agent|status|logs`: exit codes, one-line errors, rendering, and a real agent."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from hpc.cli import hpc
from hpc.status import AgentStatus, JobStatus, ServiceStatus, read_status, write_status


def config_file(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(
        f"state_dir: {tmp_path / 'state'}\n"
        f"slurm_bin_dir: {tmp_path / 'no-slurm'}\n"
        "poll_interval: 0.2\n" + extra
    )
    return path


def sample_status(now: float, stopped: bool = False) -> AgentStatus:
    return AgentStatus(
        agent_id="abc123",
        pid=4242,
        written_at=now - 2,
        poll_interval=5,
        stopped=stopped,
        services=[
            ServiceStatus("llm", "tiny", 1, 1, 0, 3, 2, 0.5, 1, 2, ["job 8: pending for 400s"])
        ],
        jobs=[
            JobStatus("7", "llm", "RUNNING", "127.0.0.1:4000", True, False, False, 3600),
            JobStatus("8", "llm", "PENDING", None, False, False, False, 3600, "Resources"),
        ],
    )


def test_agent_with_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("state_dir: /s\nservices:\n  - name: a\n    model: m\n    min_instances: -1\n")
    result = CliRunner().invoke(hpc, ["agent", "-c", str(path)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: {path}: services[0].min_instances: Input should be greater than or equal to 0"
    ]


def test_agent_without_config_file_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(hpc, ["agent", "-c", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1
    assert "cannot read" in result.output


def test_status_without_snapshot(tmp_path: Path) -> None:
    result = CliRunner().invoke(hpc, ["status", "-c", str(config_file(tmp_path))])
    assert result.exit_code == 1
    assert "no status yet" in result.output and "Traceback" not in result.output


def test_status_table_and_json(tmp_path: Path) -> None:
    path = config_file(tmp_path)
    write_status(tmp_path / "state", sample_status(time.time()))
    table = CliRunner().invoke(hpc, ["status", "-c", str(path)])
    assert table.exit_code == 0, table.output
    for text in ("agent abc123 (pid 4242)", "tiny", "1..2", "127.0.0.1:4000", "Resources"):
        assert text in table.output
    assert "warning: tiny: job 8: pending for 400s" in table.output
    raw = CliRunner().invoke(hpc, ["status", "-c", str(path), "--json"])
    data = json.loads(raw.output)
    assert data["agent_id"] == "abc123" and data["stale"] is False
    assert 1.5 < data["age_s"] < 30
    assert [j["job_id"] for j in data["jobs"]] == ["7", "8"]


def test_status_shows_a_dead_agent(tmp_path: Path) -> None:
    path = config_file(tmp_path)
    old = sample_status(time.time() - 3600)
    write_status(tmp_path / "state", old)
    result = CliRunner().invoke(hpc, ["status", "-c", str(path)])
    assert "STALE, is the agent running?" in result.output
    write_status(tmp_path / "state", sample_status(time.time(), stopped=True))
    assert "stopped" in CliRunner().invoke(hpc, ["status", "-c", str(path)]).output


@pytest.mark.parametrize("job", ["../../etc/passwd", "7/../../x", "-1", "abc", "local-", "7 8"])
def test_logs_rejects_anything_but_job_ids(tmp_path: Path, job: str) -> None:
    result = CliRunner().invoke(hpc, ["logs", "-c", str(config_file(tmp_path)), "--", job])
    assert result.exit_code == 1
    assert result.output.strip() == f"error: {job!r} is not a job id (a Slurm job id or local-N)"


def test_logs_prints_the_tail_of_a_known_job(tmp_path: Path) -> None:
    path = config_file(tmp_path)
    jobs = tmp_path / "state" / "jobs"
    jobs.mkdir(parents=True)
    (jobs / "12.log").write_text("".join(f"line {n}\n" for n in range(1000)))
    result = CliRunner().invoke(hpc, ["logs", "-c", str(path), "12", "-n", "3"])
    assert result.exit_code == 0
    assert result.output == "line 997\nline 998\nline 999\n"
    (jobs / "local-3").mkdir()
    (jobs / "local-3" / "job.log").write_text("only\n")
    assert CliRunner().invoke(hpc, ["logs", "-c", str(path), "local-3"]).output == "only\n"
    unknown = CliRunner().invoke(hpc, ["logs", "-c", str(path), "99"])
    assert unknown.exit_code == 1 and "no log of job 99" in unknown.output


async def test_agent_process_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    """A real `saia hpc agent` (Slurm unreachable here) keeps running, then stops on TERM."""
    path = config_file(tmp_path)
    saia = Path(sys.executable).with_name("saia")
    proc = await asyncio.create_subprocess_exec(
        str(saia), "hpc", "agent", "-c", str(path), stderr=asyncio.subprocess.PIPE
    )
    try:
        status_file = tmp_path / "state" / "status.json"
        for _ in range(200):  # bounded: the first loop writes it within a second or two
            if status_file.exists():
                break
            await asyncio.sleep(0.05)
        snapshot = read_status(tmp_path / "state")
        assert snapshot.pid == proc.pid and not snapshot.stopped
        assert snapshot.error.startswith("cannot list jobs: squeue: cannot run")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert read_status(tmp_path / "state").stopped
    assert proc.stderr is not None
    assert b"Traceback" not in await proc.stderr.read()
    assert (tmp_path / "state" / "agent-id").read_text().strip().isalnum()


def test_agent_with_unusable_state_dir_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    path = tmp_path / "agent.yaml"
    path.write_text(f"state_dir: {blocker / 'state'}\n")
    result = CliRunner().invoke(hpc, ["agent", "-c", str(path)])
    assert result.exit_code == 1
    assert result.output.strip() == f"error: {blocker / 'state'}: Not a directory"
