"""`saia hpc ...`: the login-node agent's commands."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from hpc.config import AgentConfig, ConfigError, load_config
from hpc.simulate.command import simulate

if TYPE_CHECKING:
    from hpc.scheduler.operator_requests import DrainRequest
    from hpc.scheduler.status import AgentStatus

DEFAULT_CONFIG = "saia-agent.yaml"
config_option = click.option(
    "--config",
    "-c",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="SAIA_AGENT_CONFIG",
    default=DEFAULT_CONFIG,
    show_default=True,
    help="agent configuration file (env SAIA_AGENT_CONFIG)",
)


def load_or_exit(path: Path) -> AgentConfig:
    """Load the config, or print its problems one per line and exit 2."""
    if not path.exists():  # most often: the -c option forgotten
        hint = "give -c FILE or set SAIA_AGENT_CONFIG"
        click.echo(f"error: {path}: cannot read: no such file ({hint})", err=True)
        sys.exit(2)
    try:
        return load_config(path)
    except ConfigError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(2)


@click.group()
def hpc() -> None:
    """The login-node agent: model-server jobs in Slurm and the request router."""


@hpc.command("check-config")
@config_option
def check_config(config_path: Path) -> None:
    """Validate the agent configuration and the paths it names; print a summary."""
    from hpc.config_check import missing_paths

    config = load_or_exit(config_path)
    missing = missing_paths(config)
    for line in missing:
        click.echo(f"error: {config_path}: {line}", err=True)
    if missing:
        sys.exit(1)
    click.echo(f"{config_path}: ok: {len(config.services)} service(s), executor {config.executor}")
    for service in config.services:
        click.echo(
            f"  {service.model_id}: template {service.template}, "
            f"{service.min_instances}..{service.max_instances} instances, "
            f"{service.resources.gpus} GPU(s) x {service.resources.nodes} node(s), "
            f"time limit {service.resources.time_limit}"
        )


@hpc.command("job-script")
@config_option
@click.argument("service_name", metavar="SERVICE")
def job_script(config_path: Path, service_name: str) -> None:
    """Print the batch script the agent would submit for SERVICE (nothing is submitted)."""
    from hpc.jobs.script import JobScriptError, render_job
    from hpc.jobs.system import JobTag
    from hpc.scheduler.state import AGENT_ID_FILE

    config = load_or_exit(config_path)
    service = config.service(service_name)
    if service is None:
        click.echo(f"error: no service {service_name!r} in {config_path}", err=True)
        sys.exit(2)
    ident = ""  # the agent's id when it has one; this command never creates state
    with contextlib.suppress(OSError):
        ident = (config.state_dir / AGENT_ID_FILE).read_text(encoding="ascii").strip()
    tag = JobTag(config.job_prefix, ident or "AGENT-ID")
    try:
        submission = render_job(service, config, tag)
    except JobScriptError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(2)
    click.echo(submission.script, nl=False)


@hpc.command("agent")
@config_option
@click.option(
    "--drain-on-exit",
    is_flag=True,
    help="cancel the agent's jobs when it stops (default: leave them for the next agent)",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
def agent(config_path: Path, drain_on_exit: bool, log_level: str) -> None:
    """Run the agent: keep model-server jobs running and route requests to them.

    A second agent on the same state dir waits as standby and takes over when the first
    stops. SIGTERM/SIGINT stop the agent; its jobs keep running unless --drain-on-exit.
    """
    config = load_or_exit(config_path)
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("httpx", "httpcore"):  # one line per health probe otherwise
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    from hpc.router import tracing
    from hpc.scheduler.agent import run_until_signal

    tracing.start(config.tracing)  # outside the event loop: stop() may block on the flush
    try:
        asyncio.run(
            run_until_signal(config, drain_on_exit=drain_on_exit, config_path=config_path.resolve())
        )
    except OSError as error:  # e.g. a state dir it cannot create or write
        click.echo(f"error: {error.filename or config.state_dir}: {error.strerror}", err=True)
        sys.exit(1)
    except Exception as error:  # a bug: the details go to the log, one line to the operator
        logging.getLogger("hpc.scheduler.agent").exception("the agent failed")
        click.echo(f"error: the agent failed: {error}", err=True)
        sys.exit(1)
    finally:
        tracing.stop()


@hpc.command("status")
@config_option
@click.option("--json", "as_json", is_flag=True, help="print the snapshot as JSON")
def status(config_path: Path, as_json: bool) -> None:
    """Show services and jobs from the agent's last status snapshot (and its age)."""
    from rich.console import Console

    from hpc.scheduler.status import StatusError, read_status, render_status, status_dict

    config = load_or_exit(config_path)
    try:
        snapshot = read_status(config.state_dir)
    except StatusError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(status_dict(snapshot, time.time()), indent=1))
        return
    rendered = render_status(snapshot)
    # Never cut a column: rich assumes 80 columns without a terminal (a pipe, `su`), and
    # a terminal narrower than the table wraps its lines rather than losing text.
    console = Console()
    natural = console.measure(rendered, options=console.options.update_width(10_000))
    width = max(console.width, natural.maximum)
    Console(width=width).print(rendered)
    if full := _disk_full(config.state_dir):
        click.echo(f"warning: {full}", err=True)


LOW_SPACE = 1024 * 1024


def _disk_full(state_dir: Path) -> str:
    """Why the agent may be unable to write its state and this snapshot, if it is so."""
    try:
        free = shutil.disk_usage(state_dir).free
    except OSError:
        return ""
    if free >= LOW_SPACE:
        return ""
    return (
        f"{state_dir} has only {free} bytes free: the agent cannot write its state or "
        "status (the snapshot may be old)"
    )


@hpc.command("logs")
@config_option
@click.argument("job")
@click.option("-n", "--lines", default=50, show_default=True, type=click.IntRange(0, 1_000_000))
@click.option("-f", "--follow", is_flag=True, help="keep printing what the job writes")
def logs(config_path: Path, job: str, lines: int, follow: bool) -> None:
    """Print the end of a job's log (JOB: a Slurm job id or local-N of this state dir)."""
    from hpc.scheduler.status import job_log, tail

    config = load_or_exit(config_path)
    try:
        path = job_log(config.state_dir, job)
        text, offset = tail(path, lines)
    except (ValueError, OSError) as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(1)
    out = sys.stdout.buffer
    out.write(text)
    out.flush()
    with contextlib.suppress(KeyboardInterrupt):
        while follow:
            time.sleep(0.5)
            with path.open("rb") as handle:
                handle.seek(offset)
                chunk = handle.read()
            offset += len(chunk)
            out.write(chunk)
            out.flush()


@hpc.command("authorized-keys")
@click.option(
    "--key",
    "key_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="the hub's public key file (.pub)",
)
@click.option("--from", "from_cidr", help="only accept the key from these addresses (CIDR, ...)")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), help="agent state")
@click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--python", default=None, help="login node python3 for the relay")
@click.option("--no-start", is_flag=True, help="the relay never starts the agent itself")
def authorized_keys(
    key_path: Path,
    from_cidr: str | None,
    state_dir: Path | None,
    config_path: Path | None,
    python: str | None,
    no_start: bool,
) -> None:
    """Print the authorized_keys line forcing the hub's key to run the relay."""
    from hpc.authorized_keys import (
        KeyLineError,
        agent_command,
        authorized_keys_line,
        default_python,
        read_public_key,
        relay_argv,
    )
    from hpc.jobs.system import private_dir

    if state_dir is None and config_path is None:
        click.echo("error: give --config (or --state-dir)", err=True)
        sys.exit(2)
    if config_path is not None:
        config_path = config_path.resolve()
        state_dir = state_dir or load_or_exit(config_path).state_dir
    assert state_dir is not None
    agent = None if no_start or config_path is None else agent_command(config_path)
    try:
        key = read_public_key(key_path)
        private_dir(state_dir)  # the relay refuses a state dir that does not exist yet
        argv = relay_argv(python or default_python(), state_dir.resolve(), agent)
        click.echo(authorized_keys_line(key, argv, from_cidr))
    except (KeyLineError, OSError) as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(2)


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


@hpc.command("drain")
@config_option
@click.argument("job", required=False)
@click.option("--service", "service_name", help="drain every job of SERVICE, one at a time")
@click.option("--now", is_flag=True, help="drain at once, without waiting for a replacement")
def drain(config_path: Path, job: str | None, service_name: str | None, now: bool) -> None:
    """Ask the running agent to replace JOB gracefully (or every job of --service).

    The agent submits a replacement; once it is ready the old job takes no new requests,
    finishes those in flight and is cancelled. --service does this job by job; --now
    drains JOB without waiting for a replacement.
    """
    from hpc.scheduler.operator_requests import write_drain

    config = load_or_exit(config_path)
    request = _checked_drain(config, config_path, job, service_name, now)
    _agent_pid_or_exit(config.state_dir)
    what = f"job {job}" if job else f"service {request.service}"
    if _wait_taken(write_drain(config.state_dir, request), config) is None:
        click.echo(f"{what}: drain requested; the agent has not taken the request yet")
        return
    how = "at once" if now else "after its replacement is ready"
    if service_name:
        how = "job by job, each after its replacement is ready"
    click.echo(f"{what}: draining {how} (follow with saia hpc status)")


@hpc.command("reload")
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


hpc.add_command(simulate)  # defined beside the simulator, to keep this module small
