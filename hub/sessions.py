"""Login sessions of the web pages: a random cookie, its digest and who it is in the database.

The cookie holds 256 random bits; the database holds only their sha256 (like API keys), so
a stolen database gives no session away. A session is valid until `expires_at`; logout
deletes its row. Lookups are cached for `ttl` seconds (as keys are): a logout takes effect
at once on the replica that served it and within the TTL on the others.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncEngine

from hub.db_health import DatabaseHealth
from hub.storage import web_sessions

COOKIE = "saia_session"
STATEMENT_TIMEOUT = 10.0  # seconds for one session statement
_TOKEN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


@dataclass(frozen=True)
class WebSession:
    user: str
    group: str | None
    admin: bool
    expires_at: float


def session_cookie(headers: Mapping[str, str]) -> str | None:
    """The session cookie's value if the request carries a well-formed one."""
    raw = headers.get("cookie")
    if not raw or COOKIE not in raw:
        return None
    try:
        morsel = SimpleCookie(raw).get(COOKIE)
    except CookieError:
        return None
    value = morsel.value if morsel is not None else ""
    if len(value) != 43 or not _TOKEN_CHARS.issuperset(value):
        return None
    return value


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class SessionStore:
    """Sessions in the database; an outage raises DatabaseUnavailable (503)."""

    def __init__(self, engine: AsyncEngine, health: DatabaseHealth, ttl: float) -> None:
        self._engine = engine
        self._health = health
        self._ttl = ttl
        self._cache: OrderedDict[str, tuple[float, WebSession | None]] = OrderedDict()

    async def create(self, session: WebSession, now: float) -> str:
        """A new session; returns the cookie value (never stored, never logged)."""
        token = secrets.token_urlsafe(32)
        values = {
            "digest": _digest(token),
            "user_name": session.user,
            "group_name": session.group,
            "admin": session.admin,
            "created_at": now,
            "expires_at": session.expires_at,
        }
        with self._health.guard("session creation"):
            async with asyncio.timeout(STATEMENT_TIMEOUT), self._engine.begin() as connection:
                # Expired sessions go when new ones come: the table stays small.
                await connection.execute(
                    delete(web_sessions).where(web_sessions.c.expires_at < now)
                )
                await connection.execute(web_sessions.insert().values(values))
        return token

    async def lookup(self, token: str, now: float) -> WebSession | None:
        """The live session of a cookie value, or None (unknown, forged or expired)."""
        digest = _digest(token)
        cached = self._cache.get(digest)
        if cached is None or cached[0] <= now:
            cached = (now + self._ttl, await self._read(digest))
            self._cache[digest] = cached
            self._cache.move_to_end(digest)
            while len(self._cache) > 10_000:
                self._cache.popitem(last=False)
        session = cached[1]
        if session is None or session.expires_at <= now:
            return None
        return session

    async def _read(self, digest: str) -> WebSession | None:
        statement = select(web_sessions).where(web_sessions.c.digest == digest)
        with self._health.guard("session lookup"):
            async with asyncio.timeout(STATEMENT_TIMEOUT), self._engine.connect() as connection:
                row = (await connection.execute(statement)).first()
        if row is None:
            return None
        return WebSession(row.user_name, row.group_name, bool(row.admin), row.expires_at)

    async def delete(self, token: str) -> None:
        digest = _digest(token)
        self._cache.pop(digest, None)
        statement = delete(web_sessions).where(web_sessions.c.digest == digest)
        with self._health.guard("session deletion"):
            async with asyncio.timeout(STATEMENT_TIMEOUT), self._engine.begin() as connection:
                await connection.execute(statement)
