"""Login sessions, owner-scoped keys and usage series on SQLite and PostgreSQL; the pure
parts of the OpenID Connect login (claims to a session) and of the config."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.requests import Request

from hub.config import ConfigError, load_config, parse_config
from hub.db_health import DatabaseHealth
from hub.errors import ApiError
from hub.key_store import KeyStore
from hub.oidc_config import OidcConfig
from hub.sessions import COOKIE, SessionStore, WebSession, session_cookie
from hub.storage import usage
from hub.usage.accounting import UsageRecord
from hub.usage.records import sanitized
from hub.usage.series import usage_series, user_totals
from hub.web.oidc import Login, check_secrets, claim_groups, session_of


async def test_sessions_live_expire_and_end(engine: AsyncEngine) -> None:
    store = SessionStore(engine, DatabaseHealth(), ttl=0.0)
    now = time.time()
    token = await store.create(WebSession("alice", "physics", False, now + 60), now)
    assert len(token) == 43
    assert await store.lookup(token, now) == WebSession("alice", "physics", False, now + 60)
    assert await store.lookup(token, now + 61) is None  # expired
    assert await store.lookup(token[:-1] + ("A" if token[-1] != "A" else "B"), now) is None
    await store.delete(token)
    assert await store.lookup(token, now) is None
    # Creating a session removes the expired ones.
    old = await store.create(WebSession("bob", None, True, now + 1), now)
    await store.create(WebSession("carol", None, False, now + 600), now + 5)
    other = SessionStore(engine, DatabaseHealth(), ttl=0.0)
    assert await other.lookup(old, now) is None


async def test_owner_scoped_keys(engine: AsyncEngine) -> None:
    keys = KeyStore(engine)
    now = time.time()
    mine, _ = await keys.create(name="a", now=now, owner="alice")
    await keys.create(name="b", now=now, owner="bob")
    assert [k.id for k in await keys.list_owned("alice")] == [mine.id]
    assert not await keys.revoke(mine.id, now, owner="bob")
    assert await keys.revoke(mine.id, now, owner="alice")
    assert not await keys.revoke(mine.id, now, owner="alice")  # already revoked


def record(request_id: str, user: str, model: str, started: float, tokens: int) -> UsageRecord:
    return UsageRecord(
        request_id, None, user, "g", model, "up", "chat/completions", 200, False,
        tokens, 0, 1.0, None, started, started + 1,
    )  # fmt: skip


async def test_usage_series_buckets_by_utc_hour_and_day(engine: AsyncEngine) -> None:
    day = 86400 * 20_000  # a UTC midnight
    rows = [
        record("1", "alice", "m1", day + 10, 5),
        record("2", "alice", "m1", day + 3599.9, 7),  # same hour (a rounding cast would move it)
        record("3", "alice", "m2", day + 3600, 11),
        record("4", "bob", "m1", day + 86399.5, 13),  # last half second of the day
    ]
    async with engine.begin() as connection:
        await connection.execute(usage.insert(), [sanitized(r).__dict__ for r in rows])
    hours = await usage_series(
        engine, since=day, until=day + 86400, by="model", bucket="hour"
    )  # fmt: skip
    assert [(r["start"] - day, r["model"], r["tokens"]) for r in hours] == [
        (0, "m1", 12), (3600, "m2", 11), (23 * 3600, "m1", 13),
    ]  # fmt: skip
    days = await usage_series(
        engine, since=day, until=day + 86400, by="user", bucket="day", user="bob"
    )  # fmt: skip
    assert [(r["start"], r["user"], r["requests"]) for r in days] == [(day, "bob", 1)]
    totals = await user_totals(engine, "alice", day, day + 86400)
    assert totals == {
        "m1": {"requests": 2, "tokens": 12, "errors": 0},
        "m2": {"requests": 1, "tokens": 11, "errors": 0},
    }
    with pytest.raises(ValueError, match="buckets"):
        await usage_series(engine, since=0, until=day, by="user", bucket="hour")


def test_claims_make_a_session() -> None:
    oidc = OidcConfig(
        issuer="https://idp.example.org", client_id="hub", group_claim="groups",
        admin_group="ops", group_map={"cn=hpc-admins": "ops", "cn=physics": "physics"},
    )  # fmt: skip
    claims = {"sub": "u1", "groups": ["cn=other", "cn=physics", "cn=hpc-admins"]}
    assert claim_groups(claims, oidc) == ["physics", "ops"]
    session = session_of(claims, oidc, now=100.0)
    assert session == WebSession("u1", "physics", True, 100.0 + oidc.session_lifetime)
    plain = oidc.model_copy(update={"group_map": {}})
    assert claim_groups({"groups": "staff"}, plain) == ["staff"]
    assert session_of({"sub": "u2"}, plain, 0.0).group is None
    with pytest.raises(ApiError, match="no `sub` claim"):
        session_of({"email": "x@y"}, oidc, 0.0)
    with pytest.raises(ApiError):
        session_of({"sub": "x" * 201}, oidc, 0.0)


def test_session_cookie_is_read_strictly() -> None:
    good = "a" * 43
    assert session_cookie({"cookie": f"other=1; {COOKIE}={good}"}) == good
    assert session_cookie({"cookie": f"{COOKIE}={good[:-1]}"}) is None
    assert session_cookie({"cookie": f'{COOKIE}="{good}\\"x"'}) is None
    assert session_cookie({}) is None


def test_oidc_config_and_secrets() -> None:
    with pytest.raises(ConfigError, match="client_id"):
        parse_config({"oidc": {"issuer": "https://idp.example.org"}})
    with pytest.raises(ConfigError, match="openid"):
        parse_config({"oidc": {"issuer": "https://i.example", "client_id": "c", "scopes": []}})
    oidc = OidcConfig(issuer="https://i.example", client_id="c", client_secret_env="CS")
    with pytest.raises(ConfigError, match="32"):
        check_secrets(oidc, {"SAIA_HUB_SESSION_SECRET": "short", "CS": "x"})
    with pytest.raises(ConfigError, match="CS is not set"):
        check_secrets(oidc, {"SAIA_HUB_SESSION_SECRET": "s" * 32})
    assert check_secrets(oidc, {"SAIA_HUB_SESSION_SECRET": "s" * 32, "CS": "x"}) == ("s" * 32, "x")


def test_database_url_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "hub.yaml"
    path.write_text("database_url: sqlite+aiosqlite:///file.db\n")
    url = "postgresql+asyncpg://hub:pw@db/hub"
    assert load_config(path, {"SAIA_HUB_DATABASE_URL": url}).database == url
    assert load_config(path, {}).database == "sqlite+aiosqlite:///file.db"
    path.write_text("database_url_env: HUB_DB\n")
    assert load_config(path, {"HUB_DB": url, "SAIA_HUB_DATABASE_URL": "x"}).database == url


async def test_provider_logout_url_comes_from_discovery_or_is_left_out() -> None:
    """RP-initiated logout: the end-session URL names the client and the account page to
    come back to; no end_session_endpoint, or a discovery that fails, leaves it out (the
    hub's own session ends either way)."""
    secret = {"SAIA_HUB_SESSION_SECRET": "s" * 32}
    config = parse_config(
        {"oidc": {"issuer": "https://idp.example", "client_id": "saia hub",
                  "redirect_url": "https://llm.example/hub/auth/callback"}}
    )  # fmt: skip
    login = Login(config, secret, lambda: None)  # type: ignore[arg-type,return-value]
    request = Request({"type": "http", "method": "POST", "path": "/auth/logout", "headers": []})

    async def discovered(metadata: dict[str, str]) -> dict[str, str]:
        return metadata

    login.client.load_server_metadata = lambda: discovered(
        {"end_session_endpoint": "https://idp.example/logout?realm=x"}
    )
    assert await login._provider_logout(request) == (
        "https://idp.example/logout?realm=x&client_id=saia+hub&post_logout_redirect_uri="
        "https%3A%2F%2Fllm.example%2Fhub%2Faccount%2F"
    )
    login.client.load_server_metadata = lambda: discovered({})
    assert await login._provider_logout(request) is None

    async def unreachable() -> dict[str, str]:
        raise httpx.ConnectError("refused")

    login.client.load_server_metadata = unreachable
    assert await login._provider_logout(request) is None
