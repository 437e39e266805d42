"""`saia hpc agent|status|logs`: exit codes, one-line errors, rendering, and a real agent."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from hpc.cli import hpc
from hpc.scheduler.status import (
    AgentStatus,
    JobStatus,
    ServiceStatus,
    StatusError,
    read_status,
    serving,
    write_status,
)
from tests.hpc.helpers import saia


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


def local_config(tmp_path: Path) -> Path:
    path = tmp_path / "local.yaml"
    path.write_text(
        f"""\
state_dir: {tmp_path / "state"}
executor: local
poll_interval: 0.3
health_interval: 0.2
backend_bind_host: 127.0.0.1
backend_advertise_host: 127.0.0.1
python: {sys.executable}
services:
  - name: tiny
    model: tiny
    template: standin
    renewal_lead: 60s
    resources: {{gpus: 0, cpus: 1, time_limit: "10:00"}}
"""
    )
    return path


async def ready_job(state_dir: Path, pid: int, limit_s: float) -> JobStatus:
    """The first ready job in the status written by the agent process `pid`."""
    async with asyncio.timeout(limit_s):
        while True:
            with contextlib.suppress(StatusError):
                status = read_status(state_dir)
                jobs = [j for j in status.jobs if j.ready and status.pid == pid]
                if jobs:
                    return jobs[0]
            await asyncio.sleep(0.1)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_local_agent_end_to_end_with_restart_and_drain(tmp_path: Path) -> None:
    """`saia hpc agent` on the local executor: serves, restarts adopting, drains on exit."""
    config, state = local_config(tmp_path), tmp_path / "state"
    saia_bin = str(Path(sys.executable).with_name("saia"))
    agent = await asyncio.create_subprocess_exec(saia_bin, "hpc", "agent", "-c", str(config))
    job_pid = 0
    try:
        job = await ready_job(state, agent.pid, 30)
        record = json.loads((state / "jobs" / job.job_id / "local.json").read_text())
        job_pid = record["pid"]
        code, out = await saia("hpc", "status", "-c", str(config), "--json")
        assert code == 0 and json.loads(out)["services"][0]["ready"] == 1
        code, out = await saia("hpc", "logs", "-c", str(config), job.job_id, "-n", "100")
        assert code == 0 and out  # the stand-in's own output
        agent.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(agent.wait(), 15) == 0
        assert alive(job_pid)  # left running for the next agent

        agent = await asyncio.create_subprocess_exec(
            saia_bin, "hpc", "agent", "-c", str(config), "--drain-on-exit"
        )
        adopted = await ready_job(state, agent.pid, 30)
        assert adopted.job_id == job.job_id
        agent.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(agent.wait(), 15) == 0
        async with asyncio.timeout(35):  # SIGTERM, then SIGKILL after the grace
            while alive(job_pid):  # noqa: ASYNC110 (a foreign process: nothing to await)
                await asyncio.sleep(0.1)
    finally:
        if agent.returncode is None:
            agent.kill()
            await agent.wait()
        if job_pid and alive(job_pid):
            os.killpg(job_pid, signal.SIGKILL)


def test_drain_needs_one_job_or_one_service(tmp_path: Path) -> None:
    path = str(config_file(tmp_path))
    for args in ([], ["7", "--service", "llm"]):
        result = CliRunner().invoke(hpc, ["drain", "-c", path, *args])
        assert result.exit_code == 2
        assert result.output.strip() == "error: give a JOB or --service NAME (not both)"
    result = CliRunner().invoke(hpc, ["drain", "-c", path, "--service", "llm", "--now"])
    assert result.exit_code == 2 and "--now drains one JOB" in result.output


def test_drain_refuses_unknown_jobs_and_a_stopped_agent(tmp_path: Path) -> None:
    path = str(config_file(tmp_path, "services:\n  - {name: llm, model: tiny}\n"))
    result = CliRunner().invoke(hpc, ["drain", "-c", path, "7"])
    assert result.exit_code == 1 and "no status yet" in result.output
    write_status(tmp_path / "state", sample_status(time.time()))
    unknown = CliRunner().invoke(hpc, ["drain", "-c", path, "99"])
    assert unknown.exit_code == 1
    assert unknown.output == "error: job 99 is not one of the agent's jobs (see saia hpc status)\n"
    # a known job, but no agent holds the lock: nothing is written
    result = CliRunner().invoke(hpc, ["drain", "-c", path, "7"])
    assert result.exit_code == 1
    assert result.output.strip() == f"error: no agent is running on {tmp_path / 'state'}"
    assert not (tmp_path / "state" / "requests").exists()
    result = CliRunner().invoke(hpc, ["drain", "-c", path, "--service", "other"])
    assert result.exit_code == 1 and "no service 'other'" in result.output


def test_reload_checks_the_config_and_the_agent(tmp_path: Path) -> None:
    broken = config_file(tmp_path, "services:\n  - {name: llm, model: tiny, min_instances: -1}\n")
    result = CliRunner().invoke(hpc, ["reload", "-c", str(broken)])
    assert result.exit_code == 2 and "min_instances" in result.output
    result = CliRunner().invoke(hpc, ["reload", "-c", str(config_file(tmp_path))])
    assert result.exit_code == 1 and "no agent is running" in result.output


def test_status_shows_operator_drains(tmp_path: Path) -> None:
    def job(draining: bool, operator: str = "", reason: str = "", ready: bool = True) -> JobStatus:
        return JobStatus(
            "7",
            "llm",
            "RUNNING",
            "h:1",
            ready,
            draining,
            False,
            60,
            operator_drain=operator,
            drain_reason=reason,
        )

    assert serving(job(True, "replace", "operator: replaced by 8")) == "draining (operator)"
    assert serving(job(False, "replace")) == "ready, drain requested"
    assert serving(job(False, "now", ready=False)) == "drain requested"
    assert serving(job(True, reason="scale down")) == "draining"
    status = sample_status(time.time())
    status.jobs[:] = [job(True, "now", "operator: now")]
    write_status(tmp_path / "state", status)
    result = CliRunner().invoke(hpc, ["status", "-c", str(config_file(tmp_path)), "--json"])
    (shown,) = json.loads(result.output)["jobs"]
    assert (shown["operator_drain"], shown["drain_reason"]) == ("now", "operator: now")


async def test_reload_of_a_real_agent_process(tmp_path: Path) -> None:
    """`saia hpc reload` and SIGHUP against `saia hpc agent` (Slurm unreachable here)."""
    path = config_file(tmp_path)
    saia_bin = str(Path(sys.executable).with_name("saia"))
    proc = await asyncio.create_subprocess_exec(
        saia_bin, "hpc", "agent", "-c", str(path), stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(20):
            while not (tmp_path / "state" / "agent.pid").exists():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        good = path.read_text()
        path.write_text(good + "services:\n  - {name: llm, model: tiny, min_instances: 0}\n")
        code, out = await saia("hpc", "reload", "-c", str(path))
        assert (code, out) == (0, "config reloaded: services llm\n")
        path.write_text(good + "job_prefix: other\n")  # valid, but needs a restart
        code, out = await saia("hpc", "reload", "-c", str(path))
        assert code == 1
        assert out == (
            "error: config reload failed, the running config stays: "
            "job_prefix: cannot change while the agent runs (restart it)\n"
        )
        path.write_text("services: [")  # broken; SIGHUP as a service manager sends it
        asked = time.time()
        proc.send_signal(signal.SIGHUP)
        async with asyncio.timeout(20):
            while (read_status(tmp_path / "state").reloaded_at or 0) < asked:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        snapshot = read_status(tmp_path / "state")
        assert snapshot.reload_error.startswith("config reload failed, the running config stays")
        assert [s.name for s in snapshot.services] == ["llm"]  # the last good config
        assert proc.returncode is None
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert not (tmp_path / "state" / "agent.pid").exists()
    assert proc.stderr is not None
    stderr = await proc.stderr.read()
    assert b"Traceback" not in stderr
    assert len([line for line in stderr.splitlines() if b"ERROR" in line]) == 2  # 2 refusals
