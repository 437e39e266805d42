"""`saia hub serve` migrates before uvicorn starts (one clear line if the database cannot be
reached); the app it serves then must not migrate a second time in its lifespan."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from hub.app import create_app
from tests.hub.helpers import ADMIN_TOKEN, hub_config


def tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as connection:
        rows = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        return {name for (name,) in rows}


async def started_and_stopped(tmp_path: Path, migrate: bool) -> set[str]:
    database = tmp_path / f"hub-{migrate}.db"
    config = hub_config(tmp_path, "http://127.0.0.1:9", "m", f"sqlite+aiosqlite:///{database}")
    app = create_app(config, {"SAIA_HUB_ADMIN_TOKEN": ADMIN_TOKEN}, migrate=migrate)
    async with app.router.lifespan_context(app):
        pass
    return tables(database)


async def test_the_app_migrates_only_when_asked(tmp_path: Path) -> None:
    assert "alembic_version" in await started_and_stopped(tmp_path, migrate=True)
    assert "alembic_version" not in await started_and_stopped(tmp_path, migrate=False)
