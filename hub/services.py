"""Everything a running hub holds, opened and closed together by the app's lifespan."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from hub.auth import Authenticator, metrics_token
from hub.batches.service import Batches
from hub.config import ConfigError, HpcUpstreamConfig, HubConfig, ModelConfig
from hub.db_health import DatabaseHealth
from hub.key_store import KeyCache, KeyStore
from hub.metrics import HubMetrics
from hub.sessions import SessionStore
from hub.storage import open_engine, upgrade
from hub.upstreams.base import ModelState, Upstream
from hub.upstreams.catalog import catalog, discovered_models, discovering
from hub.upstreams.openai import OpenAIUpstream, shared_client
from hub.usage.accounting import UsageRecorder, WriterStatus
from hub.usage.admission import Admission
from hub.usage.counters import CounterStore
from hub.usage.window_book import WindowBook
from hub.usage.window_sync import CounterSync, SyncStatus
from saia.base.http11 import HttpClient

log = logging.getLogger(__name__)

STATES_TIMEOUT = 3.0
BEHIND_AFTER = 30.0  # seconds a usage record may wait before /health calls the writer behind


def health_report(
    down_since: float | None,
    reason: str,
    writer: WriterStatus,
    interval: float,
    now: float,
    sync: SyncStatus | None = None,
) -> tuple[int, dict[str, Any]]:
    """GET /health: 200, or 503 with the reason while the database is unavailable, the
    usage writer is stopped, failing or behind, or the rate counters are not shared (pure:
    the states and `now` in; `sync` None: counted in the database, nothing to share)."""
    usage = {"pending": writer.pending, "dropped": writer.dropped, "rejected": writer.rejected}
    problems = []
    if down_since is not None:
        problems.append(f"database unavailable for {now - down_since:.0f} s ({reason})")
    if not writer.running:
        problems.append("usage writer stopped")
    elif writer.failing is not None and down_since is None:
        problems.append(f"usage writer failing ({writer.failing})")
    if writer.oldest_age > max(BEHIND_AFTER, 10 * interval):
        problems.append(
            f"usage writer behind: {writer.pending} records waiting,"
            f" the oldest for {writer.oldest_age:.0f} s"
        )
    if sync is not None:
        problems += _sync_problems(sync, now)
    body: dict[str, Any] = {
        "status": "unavailable" if problems else "ok",
        "database": "unavailable" if down_since is not None else "ok",
        "usage": usage,
    }
    if sync is not None:
        body["rate_counters"] = {"unsynced": sync.unsynced}
    if problems:
        body["reason"] = "; ".join(problems)
    return (503 if problems else 200), body


def _sync_problems(sync: SyncStatus, now: float) -> list[str]:
    if not sync.running:
        return ["rate counter sync stopped"]
    if sync.failing is None:
        return []
    since = now - (sync.failing_since or now)
    return [
        f"rate counters not shared for {since:.0f} s ({sync.failing}): each replica"
        f" enforces its own counts ({sync.unsynced} unsynced)"
    ]


@dataclass
class HubServices:
    config: HubConfig
    engine: AsyncEngine
    keys: KeyStore
    key_cache: KeyCache
    counters: CounterStore
    recorder: UsageRecorder
    auth: Authenticator
    admission: Admission
    metrics: HubMetrics
    upstreams: dict[str, Upstream]
    database: DatabaseHealth
    sessions: SessionStore | None = None  # login sessions, when OpenID Connect is on
    batches: Batches | None = None  # the Files and Batches API (config `batches.enabled`)
    counter_sync: CounterSync | None = None  # None: windows counted in the database

    def health(self) -> tuple[int, dict[str, Any]]:
        """GET /health: status code and body (see `health_report`)."""
        db = self.database
        interval = self.config.usage_flush_interval
        sync = self.counter_sync.status() if self.counter_sync is not None else None
        code, body = health_report(
            db.down_since, db.reason, self.recorder.status(), interval, time.time(), sync
        )
        if self.batches is not None and self.batches.failing:  # shown, not a reason for 503
            body["batches"] = dict(self.batches.failing)
        return code, body

    async def catalog(self) -> tuple[list[ModelConfig], dict[str, dict[str, ModelState]]]:
        """The models (configured, then discovered from the agents) and the states asked
        for them (`hub.upstreams.catalog`)."""
        names = {model.upstream for model in self.config.models} | discovering(self.config)
        states = await self.model_states(names)
        return catalog(self.config, states), states

    async def resolve(self, model_id: str) -> ModelConfig | None:
        """A configured model, else a service an agent reports now (states are cached for
        the upstream's services_ttl, so an unknown id costs one lookup per ttl)."""
        model = self.config.model(model_id)
        if model is not None or not discovering(self.config):
            return model
        states = await self.model_states(discovering(self.config))
        found = discovered_models(self.config, states)
        return next((m for m in found if m.id == model_id), None)

    async def model_states(self, names: set[str]) -> dict[str, dict[str, ModelState]]:
        """Live state per upstream (bounded in time; a failing upstream reports nothing)."""
        async with asyncio.TaskGroup() as group:
            tasks = {name: group.create_task(self._states(name)) for name in names}
        return {name: task.result() for name, task in tasks.items()}

    async def _states(self, name: str) -> dict[str, ModelState]:
        try:
            async with asyncio.timeout(STATES_TIMEOUT):
                return await self.upstreams[name].states()
        except TimeoutError:
            log.warning("upstream %s did not report its models in time", name)
            return {}


async def _open_upstreams(
    config: HubConfig,
    client: HttpClient,
    environ: Mapping[str, str],
    stack: AsyncExitStack,
) -> dict[str, Upstream]:
    upstreams: dict[str, Upstream] = {}
    for name, upstream in config.upstreams.items():
        if isinstance(upstream, HpcUpstreamConfig):
            # Imported here: the SSH side is only loaded by hubs that use it.
            from hub.upstreams.hpc import HpcUpstream

            upstreams[name] = await stack.enter_async_context(HpcUpstream(name, upstream))
        else:
            upstreams[name] = OpenAIUpstream(name, upstream, client, environ)
    return upstreams


def admin_token(config: HubConfig, environ: Mapping[str, str]) -> str | None:
    name = config.auth.admin_token_env
    token = environ.get(name) if name else None
    if not token:
        return None
    if len(token) < 16:
        raise ConfigError(f"environment variable {name}: the admin token needs 16+ characters")
    return token


def check_environment(config: HubConfig, environ: Mapping[str, str]) -> None:
    """Settings taken from the environment, checked before serving (ConfigError)."""
    admin_token(config, environ)
    metrics_token(config, environ)
    for name, upstream in config.upstreams.items():
        variable = getattr(upstream, "api_key_env", None)
        if variable and not environ.get(variable):
            raise ConfigError(f"upstream {name}: environment variable {variable} is not set")


@asynccontextmanager
async def open_services(
    config: HubConfig, environ: Mapping[str, str], *, migrate: bool = True
) -> AsyncIterator[HubServices]:
    engine = open_engine(config.database)
    try:
        if migrate:
            await upgrade(engine)
        database = DatabaseHealth()
        keys = KeyStore(engine, database)
        cache = KeyCache(keys, config.auth.key_cache_ttl)
        sessions = (
            SessionStore(engine, database, config.auth.key_cache_ttl)
            if config.oidc.enabled
            else None
        )
        async with AsyncExitStack() as stack:
            counters = await CounterStore.open(config.database)
            stack.push_async_callback(counters.aclose)
            client = await stack.enter_async_context(shared_client(config.max_connections))
            upstreams = await _open_upstreams(config, client, environ, stack)
            recorder = UsageRecorder(engine, counters, config.usage_flush_interval, database)
            await stack.enter_async_context(recorder.running())
            sync = None
            if config.counter_sync_interval > 0:
                interval = config.counter_sync_interval
                sync = CounterSync(WindowBook(), counters, interval, database)
                recorder.tokens_written = sync.book.tokens_written
                await stack.enter_async_context(sync.running())
            batches = None
            if config.batches.enabled:
                batches = Batches(config, engine, recorder, upstreams)
                await stack.enter_async_context(batches.running())
            yield HubServices(
                config=config,
                engine=engine,
                keys=keys,
                key_cache=cache,
                counters=counters,
                recorder=recorder,
                auth=Authenticator(
                    config.auth,
                    cache,
                    admin_token(config, environ),
                    metrics_token(config, environ),
                    sessions,
                ),
                admission=Admission(counters, database, sync.book if sync else None),
                metrics=HubMetrics(),
                upstreams=upstreams,
                database=database,
                batches=batches,
                sessions=sessions,
                counter_sync=sync,
            )
    finally:
        await engine.dispose()
