"""`saia sandbox slurm up|down|status`: the sandbox Slurm cluster for operators.

An operator who wants to try the agent without a cluster starts the tests' one-node
cluster (munged, slurmctld, slurmd, partition `gpu` with four fake GPUs) in a directory,
as root; it keeps running after the command returns. The pids go to
`<root>/sandbox.json`; `down` stops exactly those processes (each checked against its
command line first), after cancelling the cluster's jobs. The agent reaches the cluster
through `slurm_conf: <root>/etc/slurm.conf` in its config.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from saia.sandbox.process import SandboxError

DEFAULT_ROOT = Path("/var/tmp/saia-sandbox-slurm")
INFO_FILE = "sandbox.json"
STOP_GRACE = 10.0
COMMAND_TIMEOUT = 15.0

root_option = click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_ROOT,
    show_default=True,
    help="the cluster's directory (config, state, logs)",
)


def fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


@click.group()
def sandbox() -> None:
    """Throw-away local infrastructure to try saia without a cluster."""


@sandbox.group()
def slurm() -> None:
    """A one-node Slurm cluster on this machine (partition gpu, 4 fake GPUs; as root)."""


@slurm.command("up")
@root_option
@click.option("--cpus", type=click.IntRange(1, 1024), default=None, help="CPUs of the node")
def up(root: Path, cpus: int | None) -> None:
    """Start the cluster in ROOT; it keeps running until `saia sandbox slurm down`."""
    from saia.sandbox.slurm import SlurmSandbox

    root = root.resolve()
    if _running(root):
        fail(f"a sandbox cluster already runs in {root} (saia sandbox slurm down first)")
    cluster = SlurmSandbox(root, cpus=cpus, detach=True)
    try:
        cluster.start()
    except SandboxError as error:
        fail(str(error))
    info = {
        "pids": cluster.pids,
        "cluster": cluster.cluster,
        "slurm_conf": str(cluster.slurm_conf),
        "socket_dir": str(cluster.socket_dir),
    }
    (root / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    root.chmod(0o755)  # the functional account reads etc/slurm.conf
    click.echo(f"sandbox Slurm cluster {cluster.cluster} is up (partition gpu, 4 fake GPUs)")
    click.echo(f"slurm_conf: {cluster.slurm_conf}")
    click.echo(f"stop it with: saia sandbox slurm down --root {root}")


@slurm.command("status")
@root_option
def status(root: Path) -> None:
    """Say whether the cluster in ROOT runs, and its slurm.conf."""
    info = _running(root.resolve())
    if not info:
        fail(f"no sandbox cluster runs in {root.resolve()}")
        return
    click.echo(f"sandbox Slurm cluster {info['cluster']} is up: slurm_conf: {info['slurm_conf']}")


@slurm.command("down")
@root_option
def down(root: Path) -> None:
    """Cancel the cluster's jobs and stop its daemons (by the pids `up` saved)."""
    root = root.resolve()
    info = _read_info(root)
    if info is None:
        fail(f"no sandbox cluster was started in {root} ({INFO_FILE} is missing)")
        return
    pids = _ours(info)
    if pids:
        _cancel_jobs(info["slurm_conf"])
    for pid in reversed(pids):  # slurmd, slurmctld, munged: the reverse of the start
        _stop(pid)
    shutil.rmtree(info["socket_dir"], ignore_errors=True)
    (root / INFO_FILE).unlink(missing_ok=True)
    click.echo(f"sandbox Slurm cluster {info['cluster']} stopped ({len(pids)} daemons)")


def _read_info(root: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((root / INFO_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _running(root: Path) -> dict[str, Any] | None:
    info = _read_info(root)
    return info if info is not None and _ours(info) else None


def _ours(info: dict[str, Any]) -> list[int]:
    """The saved pids that are still this cluster's daemons: their command line names its
    slurm.conf or munge socket (a pid may have been reused since)."""
    marks = (str(info.get("slurm_conf")), str(info.get("socket_dir")))
    alive = []
    for pid in info.get("pids", []):
        try:
            argv = Path(f"/proc/{int(pid)}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if any(mark in argv for mark in marks):
            alive.append(int(pid))
    return alive


def _slurm(argv: list[str], slurm_conf: str) -> str | None:
    """stdout of a Slurm command on this cluster; None when it failed."""
    env = dict(os.environ, SLURM_CONF=slurm_conf)
    try:
        done = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _cancel_jobs(slurm_conf: str) -> None:
    """Cancel every job of the cluster and wait (bounded) until Slurm lists none."""
    squeue = ["squeue", "--noheader", "--format=%i"]
    jobs = (_slurm(squeue, slurm_conf) or "").split()
    if jobs:
        _slurm(["scancel", *jobs], slurm_conf)
    deadline = time.monotonic() + STOP_GRACE
    while jobs and time.monotonic() < deadline:
        time.sleep(0.5)
        jobs = (_slurm(squeue, slurm_conf) or "").split()


def _stop(pid: int) -> None:
    """SIGTERM, then SIGKILL after the grace; by pid only."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_GRACE
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists() or _zombie(pid):
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[:1] == ["Z"]
