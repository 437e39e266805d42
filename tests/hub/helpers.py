"""The hub served by a real uvicorn on 127.0.0.1, inside the test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn

from hub.app import create_app
from hub.config import HubConfig, parse_config
from hub.server import uvicorn_config
from hub.services import HubServices
from saia.sandbox.process import free_port

ADMIN_TOKEN = "admin-token-for-tests-0123456789"


@dataclass
class RunningHub:
    url: str
    services: HubServices

    async def create_key(self, **options: Any) -> str:
        options.setdefault("name", "test")
        _record, new = await self.services.keys.create(now=_now(), **options)
        return new.secret

    def client(self, key: str | None = None) -> httpx.AsyncClient:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, trust_env=False)


def _now() -> float:
    import time

    return time.time()


def hub_config(
    tmp_path: Any, upstream_url: str, model: str, database_url: str | None = None, **extra: Any
) -> HubConfig:
    data: dict[str, Any] = {
        "data_dir": str(tmp_path / "hub-data"),
        "database_url": database_url,
        "usage_flush_interval": 0.2,
        "upstreams": {"local": {"kind": "openai", "base_url": f"{upstream_url}/v1"}},
        "models": [{"id": model, "upstream": "local"}],
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        elif isinstance(value, list) and isinstance(data.get(key), list):
            data[key] = [*data[key], *value]
        else:
            data[key] = value
    return parse_config(data)


@asynccontextmanager
async def running_hub(
    config: HubConfig, environ: dict[str, str] | None = None, *, check_tasks: bool = True
) -> AsyncIterator[RunningHub]:
    """The hub on a free port; on exit it must leave no task behind (`check_tasks`: off
    when other components start tasks in the same loop meanwhile)."""
    app = create_app(config, {"SAIA_HUB_ADMIN_TOKEN": ADMIN_TOKEN, **(environ or {})})
    port = free_port()
    served = uvicorn_config(
        app, "127.0.0.1", port, log_level="warning", client_timeouts=config.client_timeouts
    )
    server = uvicorn.Server(served)
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
    before = asyncio.all_tasks()
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(200):
            if server.started or task.done():
                break
            await asyncio.sleep(0.02)
        if not server.started:
            await task  # raises the startup error
            raise RuntimeError("the hub did not start")
        yield RunningHub(f"http://127.0.0.1:{port}", app.state.services)
    finally:
        server.should_exit = True
        async with asyncio.timeout(15):
            await task
        # Everything the hub started (flusher, SSH supervisors, streams) ended with it.
        for _ in range(50 if check_tasks else 0):
            if not asyncio.all_tasks() - before - {task, asyncio.current_task()}:
                break
            await asyncio.sleep(0.02)
        leaked = asyncio.all_tasks() - before - {task, asyncio.current_task()}
        assert not (check_tasks and leaked), f"the hub leaked tasks: {leaked}"
