"""API keys in the database, and the short-lived in-memory cache of lookups.

The cache keeps each lookup (found or not) for `ttl` seconds, so a revoked or changed key
takes effect within that time on every replica; the hot path costs no database trip for a
key seen recently.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from hub.config import LimitsConfig
from hub.db_health import DatabaseHealth
from hub.keys import NewKey, generate_key, hash_key, key_id_of
from hub.storage import api_keys


@dataclass(frozen=True)
class KeyRecord:
    id: str
    digest: str
    name: str
    owner: str | None
    group: str | None
    admin: bool
    allowed_models: tuple[str, ...] | None
    limits: LimitsConfig
    created_at: float
    expires_at: float | None
    revoked_at: float | None

    def problem(self, now: float) -> str | None:
        """Why the key cannot be used now, or None."""
        if self.revoked_at is not None:
            return "this API key has been revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "this API key has expired"
        return None

    def allows(self, model: str) -> bool:
        return self.allowed_models is None or model in self.allowed_models

    def public(self) -> dict[str, Any]:
        """Everything but the digest (for listings and the admin API)."""
        return {
            "id": self.id,
            "name": self.name,
            "owner": self.owner,
            "group": self.group,
            "admin": self.admin,
            "allowed_models": None if self.allowed_models is None else list(self.allowed_models),
            "limits": self.limits.model_dump(exclude_none=True),
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "revoked_at": self.revoked_at,
        }


def _record(row: Any) -> KeyRecord:
    models = row.allowed_models
    return KeyRecord(
        id=row.id,
        digest=row.digest,
        name=row.name,
        owner=row.owner,
        group=row.group_name,
        admin=bool(row.admin),
        allowed_models=tuple(models) if models is not None else None,
        limits=LimitsConfig.model_validate(row.limits or {}),
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
    )


STATEMENT_TIMEOUT = 10.0  # seconds for one key statement


class KeyStore:
    """Keys in the database. With `health` (the hub), an unavailable database raises
    DatabaseUnavailable (503) instead of the driver's error (the CLI reports those)."""

    def __init__(self, engine: AsyncEngine, health: DatabaseHealth | None = None) -> None:
        self._engine = engine
        self._health = health

    def _guard(self, what: str) -> AbstractContextManager[None]:
        return self._health.guard(what) if self._health else contextlib.nullcontext()

    async def create(
        self,
        *,
        name: str,
        now: float,
        owner: str | None = None,
        group: str | None = None,
        admin: bool = False,
        allowed_models: Sequence[str] | None = None,
        limits: LimitsConfig | None = None,
        expires_at: float | None = None,
    ) -> tuple[KeyRecord, NewKey]:
        new = generate_key()
        record = KeyRecord(
            id=new.key_id,
            digest=new.digest,
            name=name,
            owner=owner,
            group=group,
            admin=admin,
            allowed_models=tuple(allowed_models) if allowed_models is not None else None,
            limits=limits or LimitsConfig(),
            created_at=now,
            expires_at=expires_at,
            revoked_at=None,
        )
        values = {
            **{k: v for k, v in record.__dict__.items() if k not in ("group", "limits")},
            "group_name": group,
            "allowed_models": list(allowed_models) if allowed_models is not None else None,
            "limits": record.limits.model_dump(exclude_none=True),
        }
        with self._guard("key creation"):
            async with asyncio.timeout(STATEMENT_TIMEOUT), self._engine.begin() as connection:
                await connection.execute(api_keys.insert().values(values))
        return record, new

    async def get(self, key_id: str) -> KeyRecord | None:
        with self._guard("key lookup"):
            async with asyncio.timeout(STATEMENT_TIMEOUT), self._engine.connect() as connection:
                result = await connection.execute(select(api_keys).where(api_keys.c.id == key_id))
                row = result.first()
        return _record(row) if row is not None else None

    async def list(self) -> list[KeyRecord]:
        with self._guard("key listing"):
            async with asyncio.timeout(STATEMENT_TIMEOUT), self._engine.connect() as connection:
                result = await connection.execute(select(api_keys).order_by(api_keys.c.created_at))
                return [_record(row) for row in result.all()]

    async def list_owned(self, owner: str) -> tuple[KeyRecord, ...]:
        """The keys of one user (the self-service page), oldest first."""
        statement = (
            select(api_keys).where(api_keys.c.owner == owner).order_by(api_keys.c.created_at)
        )
        with self._guard("key listing"):
            async with asyncio.timeout(STATEMENT_TIMEOUT), self._engine.connect() as connection:
                return tuple(_record(row) for row in (await connection.execute(statement)).all())

    async def revoke(self, key_id: str, now: float, *, owner: str | None = None) -> bool:
        """Revoke an active key; with `owner`, only if it is that user's."""
        statement = (
            update(api_keys)
            .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
            .values(revoked_at=now)
        )
        if owner is not None:
            statement = statement.where(api_keys.c.owner == owner)
        with self._guard("key update"):
            async with asyncio.timeout(STATEMENT_TIMEOUT), self._engine.begin() as connection:
                result = await connection.execute(statement)
        return result.rowcount > 0

    async def set_limits(self, key_id: str, limits: LimitsConfig) -> bool:
        statement = (
            update(api_keys)
            .where(api_keys.c.id == key_id)
            .values(limits=limits.model_dump(exclude_none=True))
        )
        with self._guard("key update"):
            async with asyncio.timeout(STATEMENT_TIMEOUT), self._engine.begin() as connection:
                result = await connection.execute(statement)
        return result.rowcount > 0


class KeyCache:
    """Recent key lookups by the presented key, found or not, for `ttl` seconds."""

    def __init__(self, store: KeyStore, ttl: float, max_entries: int = 10_000) -> None:
        self._store = store
        self._ttl = ttl
        self._max = max_entries
        self._entries: OrderedDict[str, tuple[float, KeyRecord | None]] = OrderedDict()
        self._reading: dict[str, asyncio.Task[KeyRecord | None]] = {}

    async def lookup(self, presented: str, now: float) -> KeyRecord | None:
        """The record of a presented key if it is well-formed and its secret matches."""
        digest = hash_key(presented)  # the cache never holds a secret
        cached = self._entries.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        # One database read per key at a time: thousands of requests of one key arriving as
        # its entry expires wait for the same read, instead of queueing thousands of reads
        # on the database (5000 streams at once: some waited past the statement timeout).
        # The read is shielded: a cancelled caller does not cancel it for the others.
        reading = self._reading.get(digest)
        if reading is None:
            reading = asyncio.create_task(self._read(presented, digest, now))
            self._reading[digest] = reading
            reading.add_done_callback(lambda task: self._read_done(digest, task))
        return await asyncio.shield(reading)

    def _read_done(self, digest: str, task: asyncio.Task[KeyRecord | None]) -> None:
        if self._reading.get(digest) is task:
            del self._reading[digest]
        if not task.cancelled():
            task.exception()  # the waiters raise it; none left must not log it as lost

    async def _read(self, presented: str, digest: str, now: float) -> KeyRecord | None:
        key_id = key_id_of(presented)
        record = await self._store.get(key_id) if key_id is not None else None
        if record is not None and not hmac.compare_digest(digest, record.digest):
            record = None
        self._entries[digest] = (now + self._ttl, record)
        self._entries.move_to_end(digest)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)
        return record

    def forget(self) -> None:
        self._entries.clear()


def with_limits(record: KeyRecord, limits: LimitsConfig) -> KeyRecord:
    return replace(record, limits=limits)
