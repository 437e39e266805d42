"""`saia hpc ...`: the login-node agent's commands."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from hpc.config import AgentConfig, ConfigError, load_config

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
    """Validate the agent configuration and print a summary."""
    config = load_or_exit(config_path)
    click.echo(f"{config_path}: ok: {len(config.services)} service(s), executor {config.executor}")
    for service in config.services:
        click.echo(
            f"  {service.model_id}: template {service.template}, "
            f"{service.min_instances}..{service.max_instances} instances, "
            f"{service.resources.gpus} GPU(s) x {service.resources.nodes} node(s), "
            f"time limit {service.resources.time_limit}"
        )
