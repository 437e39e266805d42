"""`saia hpc ...`: the login-node agent's commands."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import click

from hpc.cli_common import config_option, load_or_exit
from hpc.operator_cli import drain, reload
from hpc.simulate.command import simulate


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
        # uvloop (installed with uvicorn[standard]) where it is, as the hub: the router's
        # CPU per forwarded request is lower on it (python -m bench).
        gc.freeze()  # the imports' objects, out of every full collection's walk (hub/cli.py)
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(
                run_until_signal(
                    config, drain_on_exit=drain_on_exit, config_path=config_path.resolve()
                )
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


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


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


hpc.add_command(drain)  # the operator requests live beside their helpers
hpc.add_command(reload)
hpc.add_command(simulate)  # defined beside the simulator, to keep this module small
