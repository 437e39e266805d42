"""What every `saia hpc ...` command shares: the config option and loading it."""

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
    if not path.exists():  # most often: the -c option forgotten
        hint = "give -c FILE or set SAIA_AGENT_CONFIG"
        click.echo(f"error: {path}: cannot read: no such file ({hint})", err=True)
        sys.exit(2)
    try:
        return load_config(path)
    except ConfigError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(2)
