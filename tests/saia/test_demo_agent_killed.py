"""`saia demo` whose agent is SIGKILLed: the relay starts a new one, which adopts the job,
the demo keeps serving, and Ctrl-C still stops every process it or the relay started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import openai
import pytest

from saia.sandbox.process import free_port, stop_process
from tests.saia.test_demo import START_TIMEOUT, _read_until_ready

pytestmark = [pytest.mark.e2e, pytest.mark.slurm, pytest.mark.ssh]
T = TypeVar("T")


def poll(check: Callable[[], T | None], limit_s: float, what: str) -> T:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.25)
    pytest.fail(f"{what} within {limit_s:.0f} s")


def processes_of(root: Path) -> list[str]:
    """Live processes whose argv or environment names the demo's folder (agents, relays,
    Slurm daemons, job scripts, stand-in servers: SAIA_JOB_DIR is under it)."""
    found, needle = [], str(root).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if argv and (needle in argv or needle in environ):  # zombies have no argv
            command = argv.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{entry.name}: {command[:120]}")
    return found


def leader(state_dir: Path) -> int | None:
    try:
        pid = int((state_dir / "agent.pid").read_text())
    except (OSError, ValueError):
        return None
    return pid if Path(f"/proc/{pid}/cmdline").exists() else None


def slurm_jobs(root: Path) -> list[str]:
    env = dict(os.environ, SLURM_CONF=str(root / "slurm" / "etc" / "slurm.conf"))
    done = subprocess.run(
        ["squeue", "--noheader", "--format=%i %T"],
        env=env, capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    return done.stdout.split("\n")[:-1]


def ask(client: openai.OpenAI, text: str) -> str | None:
    try:
        reply = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": text}]
        )
    except openai.APIError:
        return None
    return reply.choices[0].message.content


def test_demo_survives_its_agent_killed_and_ctrl_c_stops_all(tmp_path: Path) -> None:
    root, state_dir = tmp_path / "demo", tmp_path / "demo" / "agent-state"
    argv = [sys.executable, "-m", "saia", "demo", "--port", str(free_port()), "--dir", str(root)]
    with (tmp_path / "demo.err").open("wb") as errors:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errors)
    try:
        found = _read_until_ready(process, [], START_TIMEOUT)
        client = openai.OpenAI(
            base_url=found["SAIA_BASE_URL"], api_key=found["SAIA_API_KEY"], max_retries=0
        )
        assert "before" in (ask(client, "before the kill") or "")
        jobs = slurm_jobs(root)
        first = poll(lambda: leader(state_dir), 30, "no agent leads")
        os.kill(first, signal.SIGKILL)
        started = time.monotonic()
        answer = poll(lambda: ask(client, "after the kill"), 90, "no answer after the kill")
        print(f"serving again {time.monotonic() - started:.1f} s after the agent's SIGKILL")
        assert "after" in answer
        second = poll(lambda: leader(state_dir), 30, "no new agent leads")
        assert second != first and process.poll() is None, "the demo stopped"
        assert slurm_jobs(root) == jobs, "the new agent adopted the job (no duplicate)"
        assert "after the kill" in (ask(client, "after the kill") or "")
        process.send_signal(signal.SIGINT)
        assert process.wait(150) == 0
    finally:
        stop_process(process, 150, stop_signal=signal.SIGINT)
    output = (tmp_path / "demo.err").read_text(errors="replace")
    assert "everything stopped" in output
    assert "leftover" not in output, output  # the agents drained their jobs themselves
    assert processes_of(root) == []
    assert not Path(f"/proc/{second}/cmdline").exists()


def age_s(pid: int) -> float:
    """Seconds since the process started (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time in ticks
    return float(Path("/proc/uptime").read_text().split()[0]) - started


def test_local_demo_restarts_its_killed_agent(tmp_path: Path) -> None:
    """Without sshd there is no relay: the demo itself starts a new agent (which adopts the
    local job), and Ctrl-C still leaves nothing behind."""
    from saia.demo import AGENT_MIN_LIFE

    root, state_dir = tmp_path / "demo", tmp_path / "demo" / "agent-state"
    port = str(free_port())
    argv = [sys.executable, "-m", "saia", "demo", "--local", "--port", port, "--dir", str(root)]
    with (tmp_path / "demo.err").open("wb") as errors:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errors)
    try:
        found = _read_until_ready(process, [], START_TIMEOUT)
        client = openai.OpenAI(
            base_url=found["SAIA_BASE_URL"], api_key=found["SAIA_API_KEY"], max_retries=0
        )
        first = poll(lambda: leader(state_dir), 30, "no agent leads")
        # An agent that dies right after its start is not restarted (it would die again).
        poll(lambda: age_s(first) > AGENT_MIN_LIFE + 1, 60, "the agent is not old enough")
        job_processes = [p for p in processes_of(root) if "hpc.standin" in p]
        os.kill(first, signal.SIGKILL)
        answer = poll(lambda: ask(client, "after the kill"), 90, "no answer after the kill")
        assert "after" in answer and process.poll() is None
        assert poll(lambda: leader(state_dir), 30, "no new agent leads") != first
        assert [p for p in processes_of(root) if "hpc.standin" in p] == job_processes
        process.send_signal(signal.SIGINT)
        assert process.wait(150) == 0
    finally:
        stop_process(process, 150, stop_signal=signal.SIGINT)
    output = (tmp_path / "demo.err").read_text(errors="replace")
    assert "starting a new one" in output and "leftover" not in output, output
    assert processes_of(root) == []
