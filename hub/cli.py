"""`saia hub ...`: serve the gateway, migrate its database, manage keys, report usage."""

from __future__ import annotations

import asyncio
import csv
import gc
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from hub.batches.cli import batches
from hub.config import ConfigError, HubConfig, LimitsConfig, load_config

T = TypeVar("T")

config_option = click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default="hub.yaml",
    envvar="SAIA_HUB_CONFIG",
    show_default=True,
    help="hub configuration file (env SAIA_HUB_CONFIG)",
)


def fail(message: str) -> NoReturn:
    click.echo(message, err=True)
    sys.exit(2)


def _load(path: Path) -> HubConfig:
    if not path.exists():  # most often: the -c option forgotten
        fail(f"{path}: cannot read: no such file (give -c FILE or set SAIA_HUB_CONFIG)")
    try:
        return load_config(path)
    except ConfigError as error:
        fail(str(error))


def _with_engine(config: HubConfig, work: Callable[[Any], Awaitable[T]]) -> T:
    """Run `work(engine)` on a migrated database; one clear line if it cannot be reached."""
    from sqlalchemy.exc import SQLAlchemyError

    from hub.storage import open_engine, upgrade

    async def run() -> T:
        engine = open_engine(config.database)
        try:
            await upgrade(engine)
            return await work(engine)
        finally:
            await engine.dispose()

    try:
        return asyncio.run(run())
    except (SQLAlchemyError, OSError) as error:
        fail(f"database {config.database.split('@')[-1]}: {type(error).__name__}: {error}")


def _migrate(config: HubConfig) -> None:
    """Bring the schema up to date (a migrated database is all `_with_engine` leaves)."""

    async def nothing(_engine: Any) -> None:
        return None

    _with_engine(config, nothing)


@click.group()
def hub() -> None:
    """The OpenAI-compatible gateway: keys, limits, accounting and upstreams."""


@hub.command()
@config_option
@click.option("--host", default=None, help="override the config's host")
@click.option("--port", type=int, default=None, help="override the config's port")
def serve(config_path: Path, host: str | None, port: int | None) -> None:
    """Run the gateway (FastAPI on uvicorn)."""
    import uvicorn

    from hub.app import create_app
    from hub.server import uvicorn_config
    from hub.upstreams import tracing

    config = _load(config_path)
    try:
        app = create_app(config, migrate=False)  # _migrate below, once
    except ConfigError as error:
        fail(str(error))

    _migrate(config)  # unreachable database: one line, not a traceback
    port = port if port is not None else config.port
    served = uvicorn_config(app, host or config.host, port, client_timeouts=config.client_timeouts)
    tracing.start(config.tracing)  # outside the event loop: stop() may block on the flush
    # What exists now lives as long as the process: out of the collector's way, a full
    # collection no longer walks the ~130k objects of the imports (76 ms each time, a stall
    # of every request in flight: the p99 at 64 concurrent in python -m bench).
    gc.freeze()
    try:
        uvicorn.Server(served).run()
    finally:
        tracing.stop()


hub.add_command(batches)  # saia hub batches list|show|cancel (hub/batches/cli.py)


@hub.group()
def db() -> None:
    """The hub's database."""


@db.command("upgrade")
@config_option
def db_upgrade(config_path: Path) -> None:
    """Create or migrate the schema to the newest version (also done at start)."""
    config = _load(config_path)

    _migrate(config)
    click.echo(f"database is up to date: {config.database.split('@')[-1]}")


def _limits(values: dict[str, Any]) -> LimitsConfig:
    return LimitsConfig.model_validate({k: v for k, v in values.items() if v is not None})


def _limit_options(command: Callable[..., Any]) -> Callable[..., Any]:
    for name in reversed(
        [
            "requests-per-minute",
            "requests-per-hour",
            "requests-per-day",
            "requests-per-month",
            "tokens-per-day",
            "tokens-per-month",
            "concurrent",
        ]
    ):
        command = click.option(f"--{name}", type=click.IntRange(min=0), default=None)(command)
    return command


@hub.group()
def keys() -> None:
    """API keys (stored hashed; the secret is shown once, at creation)."""


@keys.command("create")
@config_option
@click.option("--name", required=True, help="what the key is for")
@click.option("--user", "owner", default=None, help="the person the key belongs to")
@click.option("--group", default=None)
@click.option("--model", "models", multiple=True, help="allowed model (repeat); default all")
@click.option("--expires", default=None, help="lifetime such as 30d or 12h")
@click.option("--admin", is_flag=True, help="may use the admin API")
@_limit_options
def keys_create(
    config_path: Path,
    name: str,
    owner: str | None,
    group: str | None,
    models: tuple[str, ...],
    expires: str | None,
    admin: bool,
    **limits: int | None,
) -> None:
    """Create a key and print its secret (once)."""
    from hub.key_store import KeyStore
    from saia.base.durations import parse_duration

    config = _load(config_path)
    try:
        lifetime = parse_duration(expires) if expires else None
    except ValueError as error:
        fail(f"--expires: {error}")
    unknown = [m for m in models if config.model(m) is None]
    if unknown:
        fail(f"--model: not configured: {', '.join(unknown)}")
    now = time.time()

    async def create(engine: Any) -> Any:
        return await KeyStore(engine).create(
            name=name, now=now, owner=owner, group=group, admin=admin,
            allowed_models=list(models) or None, limits=_limits(limits),
            expires_at=now + lifetime if lifetime else None,
        )  # fmt: skip

    record, new = _with_engine(config, create)
    click.echo(f"created key {record.id} ({name}); the secret is shown only now:", err=True)
    click.echo(new.secret)


@keys.command("list")
@config_option
@click.option("--json", "as_json", is_flag=True)
def keys_list(config_path: Path, as_json: bool) -> None:
    """All keys, without secrets."""
    from hub.key_store import KeyStore

    config = _load(config_path)

    async def listing(engine: Any) -> Any:
        return await KeyStore(engine).list()

    records = [r.public() for r in _with_engine(config, listing)]
    if as_json:
        click.echo(json.dumps(records, indent=2))
        return
    click.echo(_keys_table(records, time.time()), nl=False)


LIMIT_NAMES = {  # short forms for the table; --json has the full names
    "requests_per_minute": "rpm",
    "requests_per_hour": "rph",
    "requests_per_day": "rpd",
    "requests_per_month": "rpmon",
    "tokens_per_day": "tpd",
    "tokens_per_month": "tpmon",
    "concurrent": "conc",
}


def _keys_table(records: list[dict[str, Any]], now: float) -> str:
    """`keys list` as a table with a header: state, owner, models, expiry and limits."""
    header = ("id", "state", "owner", "models", "expires (UTC)", "limits", "name")
    rows = [header]
    for r in records:
        state = "revoked" if r["revoked_at"] else "active"
        if state == "active" and r["expires_at"] and r["expires_at"] <= now:
            state = "expired"
        allowed = r["allowed_models"]
        models = "*" if allowed is None else ",".join(allowed) or "(none)"
        expires = "never"
        if r["expires_at"]:
            expires = time.strftime("%Y-%m-%d %H:%M", time.gmtime(r["expires_at"]))
        limits = ",".join(f"{LIMIT_NAMES.get(k, k)}={v}" for k, v in r["limits"].items())
        admin = " (admin)" if r["admin"] else ""
        owner = r["owner"] or "-"
        rows.append((r["id"], state, owner, models, expires, limits or "-", r["name"] + admin))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return "".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
        + "  "
        + row[-1]
        + "\n"
        for row in rows
    )


@keys.command("show")
@config_option
@click.argument("key_id")
def keys_show(config_path: Path, key_id: str) -> None:
    """One key's settings as JSON."""
    from hub.key_store import KeyStore

    config = _load(config_path)

    async def get(engine: Any) -> Any:
        return await KeyStore(engine).get(key_id)

    record = _with_engine(config, get)
    if record is None:
        fail(f"no key {key_id}")
    click.echo(json.dumps(record.public(), indent=2))


@keys.command("revoke")
@config_option
@click.argument("key_id")
def keys_revoke(config_path: Path, key_id: str) -> None:
    """Revoke a key (running hubs notice within auth.key_cache_ttl)."""
    from hub.key_store import KeyStore

    config = _load(config_path)

    async def revoke(engine: Any) -> bool:
        return await KeyStore(engine).revoke(key_id, time.time())

    if not _with_engine(config, revoke):
        fail(f"no active key {key_id}")
    click.echo(f"revoked {key_id}")


@hub.command()
@config_option
@click.option("--since", default=None, help="first day, e.g. 2026-11-01 (UTC)")
@click.option("--until", default=None, help="end (exclusive)")
@click.option(
    "--by", type=click.Choice(["user", "key", "model", "group", "upstream"]), default="user"
)
@click.option("--csv", "as_csv", is_flag=True, help="CSV instead of a table")
def usage(config_path: Path, since: str | None, until: str | None, by: str, as_csv: bool) -> None:
    """Requests and tokens per user, key, model, group or upstream since a day; `--by group`
    without --since: each group's current windows against its budget (auth.group_limits)."""
    from hub.usage.accounting import parse_moment, usage_summary

    config = _load(config_path)
    if since is None and by == "group":
        _group_budgets(config, as_csv)
        return
    if since is None:
        fail("--since is required (but for --by group: the current windows of group budgets)")
    try:
        start = parse_moment(since)
        end = parse_moment(until) if until else None
    except ValueError as error:
        fail(f"--since/--until: {error}")

    async def summary(engine: Any) -> list[dict[str, Any]]:
        return await usage_summary(engine, since=start, until=end, by=by)  # type: ignore[arg-type]

    rows = _with_engine(config, summary)
    columns = [by, "requests", "errors", "prompt_tokens", "completion_tokens", "mean_latency_ms"]
    _print_rows(columns, rows, as_csv)


def _print_rows(columns: list[str], rows: list[dict[str, Any]], as_csv: bool) -> None:
    if as_csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows([[row[c] for c in columns] for row in rows])
        return
    click.echo("  ".join(f"{c:>18}" for c in columns))
    for row in rows:
        click.echo("  ".join(f"{row[c] if row[c] is not None else '-'!s:>18}" for c in columns))


def _group_budgets(config: HubConfig, as_csv: bool) -> None:
    """Each group's use of its current windows next to its limits (`-`: no limit)."""
    from hub.usage.budgets import COLUMNS, group_budgets

    if not config.auth.group_limits:
        fail("no group budgets are configured (auth.group_limits)")
    now = time.time()

    async def budgets(engine: Any) -> list[dict[str, Any]]:
        return await group_budgets(engine, config.auth.group_limits, now)

    rows = _with_engine(config, budgets)
    for row in rows:
        if not as_csv:  # a date for people, epoch seconds in CSV
            row["resets_at"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(row["resets_at"]))
    _print_rows(list(COLUMNS), rows, as_csv)
