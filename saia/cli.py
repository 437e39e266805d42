"""The `saia` command: one entry point whose groups live with their components."""

from __future__ import annotations

import click

from saia import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="saia")
def cli() -> None:
    """saia: large language models from an HPC cluster, served to the web."""


def _register() -> None:
    # Imported here so that `saia --version` stays fast.
    from hpc.cli import hpc
    from hub.cli import hub
    from saia.demo import demo
    from saia.sandbox.slurm_command import sandbox

    for command in (hpc, hub, demo, sandbox):
        cli.add_command(command)


def main() -> None:
    _register()
    cli()
