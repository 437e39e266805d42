"""`saia hub batches list|show|cancel`: the operator's view of every owner's batches.

It reads and changes the database only: a cancel marks the batch `cancelling`, and a running
hub's poller stops its job at the next poll (`batches.poll_interval`).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import click
from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError

from hub.batches.tables import batches as table
from hub.config import ConfigError, HubConfig, load_config

ACTIVE = ("validating", "in_progress")


def _fail(message: str) -> NoReturn:
    click.echo(message, err=True)
    sys.exit(2)


def _config(path: Path) -> HubConfig:
    if not path.exists():
        _fail(f"{path}: cannot read: no such file (give -c FILE or set SAIA_HUB_CONFIG)")
    try:
        return load_config(path)
    except ConfigError as error:
        _fail(str(error))


def _run(config: HubConfig, statement: Any, write: bool = False) -> Any:
    from hub.storage import open_engine, upgrade

    async def run() -> Any:
        engine = open_engine(config.database)
        try:
            await upgrade(engine)
            async with engine.begin() as connection:
                result = await connection.execute(statement)
                return result.rowcount if write else result.all()
        finally:
            await engine.dispose()

    try:
        return asyncio.run(run())
    except (SQLAlchemyError, OSError) as error:
        _fail(f"database {config.database.split('@')[-1]}: {type(error).__name__}: {error}")


config_option = click.option(
    "-c", "--config", "config_path", type=click.Path(path_type=Path, dir_okay=False),
    default="hub.yaml", envvar="SAIA_HUB_CONFIG", show_default=True,
    help="hub configuration file (env SAIA_HUB_CONFIG)",
)  # fmt: skip


@click.group()
def batches() -> None:
    """Batches of every owner: list, show, cancel."""


def _when(value: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(value)) if value else "-"


@batches.command("list")
@config_option
@click.option("--status", default=None, help="only batches in this status")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10000))
def batches_list(config_path: Path, status: str | None, limit: int) -> None:
    """The newest batches: id, status, owner, model, requests done/failed/total, created."""
    statement = select(table).order_by(table.c.created_at.desc()).limit(limit)
    if status:
        statement = statement.where(table.c.status == status)
    rows = _run(_config(config_path), statement)
    header = ("id", "status", "owner", "model", "done/failed/total", "created (UTC)")
    lines = [header]
    for r in rows:
        counts = f"{r.completed}/{r.failed}/{r.total}"
        lines.append((r.id, r.status, r.owner, r.model, counts, _when(r.created_at)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())


@batches.command("show")
@config_option
@click.argument("batch_id")
def batches_show(config_path: Path, batch_id: str) -> None:
    """One batch as JSON: status, counts, tokens, price factor, Slurm job, last message."""
    rows = _run(_config(config_path), select(table).where(table.c.id == batch_id))
    if not rows:
        _fail(f"no batch {batch_id}")
    click.echo(json.dumps(dict(rows[0]._mapping), indent=2, default=str))


@batches.command("cancel")
@config_option
@click.argument("batch_id")
def batches_cancel(config_path: Path, batch_id: str) -> None:
    """Cancel a running batch (its job is stopped at the hub's next poll)."""
    statement = (
        update(table)
        .where(table.c.id == batch_id, table.c.status.in_(ACTIVE))
        .values(status="cancelling", cancelling_at=time.time())
    )
    if _run(_config(config_path), statement, write=True) != 1:
        _fail(f"no running batch {batch_id}")
    click.echo(f"cancelling {batch_id}")
