"""The `saia` command: one entry point whose groups live with their components."""

from __future__ import annotations

import click

from saia import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="saia")
def cli() -> None:
    """saia: large language models from an HPC cluster, served to the web."""


def _register() -> None:
    # Imported here so that `saia --version` stays fast and one broken
    # component cannot hide the others' commands.
    from hpc.cli import hpc

    cli.add_command(hpc)
    try:
        from hub.cli import hub
    except ImportError:  # pragma: no cover - hub not built yet
        pass
    else:
        cli.add_command(hub)
    try:
        from saia.demo import demo
    except ImportError:  # pragma: no cover - demo not built yet
        pass
    else:
        cli.add_command(demo)


def main() -> None:
    _register()
    cli()
