"""`saia hpc drain` and `saia hpc reload`: operator requests to the running agent.

Each writes a request file into `<state_dir>/requests/` (`hpc/scheduler/operator_requests.py`),
signals the leader and waits (bounded) until it took the request.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from hpc.cli_common import config_option, load_or_exit
from hpc.config import AgentConfig

if TYPE_CHECKING:
    from hpc.scheduler.operator_requests import DrainRequest
    from hpc.scheduler.status import AgentStatus


def _agent_pid_or_exit(state_dir: Path, reload: bool = False) -> int:
    from hpc.scheduler.operator_requests import RequestError, leader_pid

    try:
        return leader_pid(state_dir)
    except RequestError as error:
        # The agent is found through the file's state_dir: after a change of it, the
        # running agent is elsewhere, and a reload could not apply the change anyway.
        hint = " (state_dir cannot change by a reload: restart the agent)" if reload else ""
        click.echo(f"error: {error}{hint}", err=True)
        sys.exit(1)


def _wait_taken(path: Path, config: AgentConfig) -> float | None:
    """Nudge the agent and wait (bounded) until it took the request file; when it did."""
    from hpc.scheduler.operator_requests import WAKE_SIGNAL, RequestError, nudge

    with contextlib.suppress(RequestError):  # the file stays: the next loop takes it
        nudge(config.state_dir, WAKE_SIGNAL)
    deadline = time.monotonic() + 2 * config.poll_interval + 5
    while path.exists():
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)
    return time.time()


def _reload_outcome(config: AgentConfig, asked: float) -> AgentStatus | None:
    """The first status snapshot showing a reload handled after `asked` (bounded wait)."""
    from hpc.scheduler.status import StatusError, read_status

    deadline = time.monotonic() + 2 * config.poll_interval + 5
    while time.monotonic() < deadline:
        with contextlib.suppress(StatusError):
            snapshot = read_status(config.state_dir)
            if snapshot.reloaded_at is not None and snapshot.reloaded_at >= asked:
                return snapshot
        time.sleep(0.05)
    return None


def _checked_drain(
    config: AgentConfig, config_path: Path, job: str | None, service_name: str | None, now: bool
) -> DrainRequest:
    """The drain request, or one error line and exit: a job the agent lists, or a service
    of the config."""
    from hpc.scheduler.operator_requests import DrainRequest, RequestError, check_job_id
    from hpc.scheduler.status import StatusError, read_status

    if (job is None) == (service_name is None):
        click.echo("error: give a JOB or --service NAME (not both)", err=True)
        sys.exit(2)
    if service_name is not None and now:
        click.echo("error: --now drains one JOB (a service is drained job by job)", err=True)
        sys.exit(2)
    if service_name is not None:
        service = config.service(service_name)
        if service is None:
            click.echo(f"error: no service {service_name!r} in {config_path}", err=True)
            sys.exit(1)
        return DrainRequest(service=service.name, now=now)
    assert job is not None
    try:
        snapshot = read_status(config.state_dir)
        check_job_id(job)
    except (RequestError, StatusError) as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(1)
    if job not in {j.job_id for j in snapshot.jobs if not j.cancelled}:
        click.echo(
            f"error: job {job} is not one of the agent's jobs (see saia hpc status)", err=True
        )
        sys.exit(1)
    return DrainRequest(job_id=job, now=now)


@click.command("drain")
@config_option
@click.argument("job", required=False)
@click.option("--service", "service_name", help="drain every job of SERVICE, one at a time")
@click.option("--now", is_flag=True, help="drain at once, without waiting for a replacement")
@click.option("--cancel", is_flag=True, help="withdraw the drain of JOB (before it drains)")
def drain(
    config_path: Path, job: str | None, service_name: str | None, now: bool, cancel: bool
) -> None:
    """Ask the running agent to replace JOB gracefully (or every job of --service).

    The agent submits a replacement; once it is ready the old job takes no new requests,
    finishes those in flight and is cancelled. --service does this job by job; --now
    drains JOB without waiting for a replacement; --cancel takes a drain of JOB back
    while it waits for its replacement (one still pending is then cancelled).
    """
    from dataclasses import replace

    from hpc.scheduler.operator_requests import write_drain

    config = load_or_exit(config_path)
    if cancel and (now or service_name):
        click.echo("error: --cancel withdraws the drain of one JOB", err=True)
        sys.exit(2)
    request = replace(_checked_drain(config, config_path, job, service_name, now), withdraw=cancel)
    _agent_pid_or_exit(config.state_dir)
    what = f"job {job}" if job else f"service {request.service}"
    if _wait_taken(write_drain(config.state_dir, request), config) is None:
        click.echo(f"{what}: request written; the agent has not taken it yet")
        return
    if cancel:
        click.echo(f"{what}: drain withdrawn if it had not started (see saia hpc status)")
        return
    how = "at once" if now else "after its replacement is ready"
    if service_name:
        how = "job by job, each after its replacement is ready"
    click.echo(f"{what}: draining {how} (follow with saia hpc status)")


@click.command("reload")
@config_option
def reload(config_path: Path) -> None:
    """Make the running agent re-read its config file (like SIGHUP), without downtime.

    Services added start, services removed are drained and cancelled, new min/max apply
    at once and new job settings to the next job submitted (roll with drain --service).
    """
    from hpc.scheduler.operator_requests import write_reload

    config = load_or_exit(config_path)  # say what is wrong before the agent does
    _agent_pid_or_exit(config.state_dir, reload=True)
    asked = time.time()
    _wait_taken(write_reload(config.state_dir), config)
    snapshot = _reload_outcome(config, asked)
    if snapshot is None:
        click.echo("reload requested; the agent has not handled it yet (see saia hpc status)")
    elif snapshot.reload_error:
        click.echo(f"error: {snapshot.reload_error}", err=True)
        sys.exit(1)
    else:
        click.echo(f"config reloaded: services {', '.join(s.name for s in snapshot.services)}")
