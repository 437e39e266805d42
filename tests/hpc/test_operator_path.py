"""What an operator met on the agent side (issue 18): wide status tables, a forgotten
`-c`, check-config of missing paths, and a reload after a change of state_dir."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from hpc.cli import hpc
from hpc.scheduler.status import AgentStatus, JobStatus, ServiceStatus, write_status


def config_file(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(f"state_dir: {tmp_path / 'state'}\npoll_interval: 0.2\n" + extra)
    return path


def test_status_is_never_cut_without_a_terminal(tmp_path: Path) -> None:
    note = "JobHeldAdmin: the partition gpu is drained for maintenance until Monday morning"
    status = AgentStatus(
        agent_id="abc123",
        pid=4242,
        written_at=time.time(),
        poll_interval=5,
        services=[ServiceStatus("llm", "meta-llama/Llama-3.1-8B-Instruct", 1, 1, 0, 0, 0, 0, 1, 2)],
        jobs=[JobStatus("4711", "llm", "PENDING", None, False, False, False, 43200, note)],
    )
    write_status(tmp_path / "state", status)
    result = CliRunner().invoke(hpc, ["status", "-c", str(config_file(tmp_path))])
    assert result.exit_code == 0
    assert note in result.output and "meta-llama/Llama-3.1-8B-Instruct" in result.output
    assert "…" not in result.output


@pytest.mark.parametrize("args", [("logs", "4711"), ("status",), ("reload",)])
def test_a_missing_default_config_says_how_to_give_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: tuple[str, ...]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SAIA_AGENT_CONFIG", raising=False)
    result = CliRunner().invoke(hpc, list(args))
    assert result.exit_code == 2
    assert result.output == (
        "error: saia-agent.yaml: cannot read: no such file "
        "(give -c FILE or set SAIA_AGENT_CONFIG)\n"
    )
    monkeypatch.setenv("SAIA_AGENT_CONFIG", str(config_file(tmp_path)))
    result = CliRunner().invoke(hpc, list(args))
    assert "SAIA_AGENT_CONFIG" not in result.output  # found: fails later, for its own reason


def test_check_config_names_paths_that_do_not_exist(tmp_path: Path) -> None:
    (tmp_path / "models" / "m").mkdir(parents=True)
    services = (
        "services:\n"
        f"  - {{name: a, model: {tmp_path}/models/m, container_binds: ['{tmp_path}/models']}}\n"
        "  - {name: b, model: org/model-on-the-hub}\n"
    )
    good = config_file(tmp_path, services)
    result = CliRunner().invoke(hpc, ["check-config", "-c", str(good)])
    assert result.exit_code == 0 and ": ok: 2 service(s)" in result.output
    bad = config_file(
        tmp_path,
        services.replace("models/m,", "models/typo,") + "python: /nowhere/python3\n"
        f"slurm_bin_dir: {tmp_path}/no-slurm\n",
    )
    result = CliRunner().invoke(hpc, ["check-config", "-c", str(bad)])
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        f"error: {bad}: slurm_bin_dir: {tmp_path}/no-slurm does not exist",
        f"error: {bad}: python: /nowhere/python3 does not exist",
        f"error: {bad}: services[0].model: {tmp_path}/models/typo does not exist",
    ]


def test_reload_after_a_state_dir_change_says_it_needs_a_restart(tmp_path: Path) -> None:
    path = config_file(tmp_path)
    path.write_text(f"state_dir: {tmp_path / 'moved'}\n")
    result = CliRunner().invoke(hpc, ["reload", "-c", str(path)])
    assert result.exit_code == 1
    assert result.output == (
        f"error: no agent is running on {tmp_path / 'moved'} "
        "(state_dir cannot change by a reload: restart the agent)\n"
    )


def test_authorized_keys_creates_the_state_dir_the_relay_needs(tmp_path: Path) -> None:
    # The relay refuses a state dir that does not exist: before this, the guide's first
    # request failed unless the agent had been run by hand once.
    import subprocess

    key = tmp_path / "hub"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    path = tmp_path / "agent.yaml"
    path.write_text(f"state_dir: {tmp_path / 'deep' / 'state'}\n")
    args = ["authorized-keys", "--key", f"{key}.pub", "-c", str(path)]
    result = CliRunner().invoke(hpc, args)
    assert result.exit_code == 0, result.output
    state = tmp_path / "deep" / "state"
    assert state.is_dir() and state.stat().st_mode & 0o777 == 0o700
