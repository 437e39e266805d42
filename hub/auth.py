"""Who is calling: an API key, or a user named by a trusted reverse proxy."""

from __future__ import annotations

import functools
import hmac
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from urllib.parse import urlsplit

from hub.config import AuthConfig, ConfigError, HubConfig, LimitsConfig
from hub.errors import ApiError
from hub.key_store import KeyCache, KeyRecord
from hub.sessions import SessionStore, session_cookie

# Sec-Fetch-Site values of requests a page of another origin started.
_FOREIGN_SITES = frozenset({"cross-site", "same-site"})


@dataclass(frozen=True)
class Principal:
    key_id: str | None
    user: str | None
    group: str | None
    allowed_models: tuple[str, ...] | None
    key_limits: LimitsConfig | None
    user_limits: LimitsConfig
    admin: bool = False
    group_limits: LimitsConfig | None = None  # the group's budget (auth.group_limits)

    def allows(self, model: str) -> bool:
        return self.allowed_models is None or model in self.allowed_models

    @cached_property
    def subjects(self) -> tuple[tuple[str, LimitsConfig], ...]:
        """Rate-limit subjects: the key with its limits, and the user with the user limits."""
        subjects: list[tuple[str, LimitsConfig]] = []
        if self.key_id is not None and self.key_limits is not None:
            subjects.append((f"key:{self.key_id}", self.key_limits))
        if self.user is not None:
            subjects.append((f"user:{self.user}", self.user_limits))
        if self.group is not None and self.group_limits is not None:
            subjects.append((f"group:{self.group}", self.group_limits))
        return tuple(subjects)

    def limited_subjects(self) -> list[tuple[str, LimitsConfig]]:
        return list(self.subjects)


@functools.lru_cache(maxsize=4096)
def merge_limits(specific: LimitsConfig, default: LimitsConfig) -> LimitsConfig:
    """Each limit from `specific` where set, from `default` otherwise."""
    values = {
        name: getattr(specific, name) if getattr(specific, name) is not None else value
        for name, value in default.model_dump().items()
    }
    return LimitsConfig.model_validate(values)


def metrics_token(config: HubConfig, environ: Mapping[str, str]) -> str | None:
    """The token that may read /metrics, from the environment variable the config names."""
    name = config.auth.metrics_token_env
    token = environ.get(name) if name else None
    if not token:
        return None
    if len(token) < 16:
        raise ConfigError(f"environment variable {name}: the metrics token needs 16+ characters")
    return token


def _same_token(token: str, expected: bytes | None) -> bool:
    # Bytes, not str: compare_digest refuses non-ASCII str (a header may carry any byte).
    return expected is not None and hmac.compare_digest(token.encode(), expected)


def browser_problem(headers: Mapping[str, str], allowed_origins: frozenset[str]) -> str | None:
    """Why a request that the proxy identifies by its session (cookie) may have been sent by
    a page of another site in the user's name (cross-site request forgery), or None.

    A page elsewhere can make the browser send a simple request (a form, or `fetch` without
    CORS) but cannot set `Content-Type: application/json` without a preflight, which the hub
    never grants; and browsers mark such requests with `Origin` and `Sec-Fetch-Site`."""
    origin = headers.get("origin")
    if origin is None or origin.lower() not in allowed_origins:
        if headers.get("sec-fetch-site", "").lower() in _FOREIGN_SITES:
            return "cross-site request refused: a page of another site sent it"
        if origin is not None and _netloc(origin) != _host(headers):
            return "cross-origin request refused: its Origin is not this hub"
    length = headers.get("content-length")
    if (length not in (None, "0") or "transfer-encoding" in headers) and not _json(headers):
        return "a request with a body must have `Content-Type: application/json`"
    return None


def _netloc(origin: str) -> str | None:
    try:
        return urlsplit(origin.lower()).netloc
    except ValueError:  # e.g. an unclosed [IPv6 bracket
        return None


def _host(headers: Mapping[str, str]) -> str:
    return headers.get("host", "").lower() or "-"  # no Host: matches no origin


def _json(headers: Mapping[str, str]) -> bool:
    media_type = headers.get("content-type", "").partition(";")[0]
    return media_type.strip().lower() == "application/json"


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class Authenticator:
    def __init__(
        self,
        config: AuthConfig,
        cache: KeyCache,
        admin_token: str | None,
        metrics_token: str | None = None,
        sessions: SessionStore | None = None,
    ) -> None:
        self._config = config
        self._sessions = sessions
        self._cache = cache
        self._admin_token = admin_token.encode() if admin_token else None
        self._metrics_token = metrics_token.encode() if metrics_token else None
        self._origins = frozenset(config.allowed_origins)
        self._proxies = [ipaddress.ip_network(c, strict=False) for c in config.trusted_proxies]
        # The principal of each cached key record, reused while the cache returns that record.
        self._principals: dict[str, tuple[KeyRecord, Principal]] = {}

    def _trusted(self, client_host: str | None) -> bool:
        if client_host is None:
            return False
        try:
            address = ipaddress.ip_address(client_host)
        except ValueError:
            return False
        return any(address in network for network in self._proxies)

    async def authenticate(
        self, headers: Mapping[str, str], client_host: str | None, now: float
    ) -> Principal:
        token = bearer_token(headers.get("authorization"))
        if token is not None:
            return await self._by_key(token, now)
        by_session = await self._by_session(headers, now)
        if by_session is not None:
            return by_session
        header = self._config.proxy_user_header
        if header and self._trusted(client_host):
            user = headers.get(header.lower(), "").strip()
            if user:
                problem = browser_problem(headers, self._origins)
                if problem is not None:
                    raise ApiError(403, problem, code="cross_site_request")
                group = self._group(headers)
                _check_identity_length(user, group)
                budget = self._config.group_limits.get(group or "")
                return Principal(
                    None, user, group, None, None, self._config.user_limits, False, budget
                )
        raise ApiError(
            401,
            "missing API key: send `Authorization: Bearer sk-saia-...`",
            code="missing_api_key",
        )

    def _group(self, headers: Mapping[str, str]) -> str | None:
        header = self._config.proxy_group_header
        value = headers.get(header.lower(), "").strip() if header else ""
        return value or None

    async def authenticate_admin(self, headers: Mapping[str, str], now: float) -> Principal:
        """The admin API: the admin token (from the environment) or a key flagged admin."""
        token = bearer_token(headers.get("authorization"))
        if token is None:
            by_session = await self._by_session(headers, now)
            if by_session is None:
                raise ApiError(401, "missing admin token", code="missing_api_key")
            if not by_session.admin:
                raise ApiError(403, "you are not in the admin group", code="not_admin")
            return by_session
        if _same_token(token, self._admin_token):
            return Principal(None, "admin", None, None, None, self._config.user_limits, True)
        principal = await self._by_key(token, now)
        if not principal.admin:
            raise ApiError(403, "this key is not an admin key", code="not_admin")
        return principal

    async def authenticate_metrics(self, headers: Mapping[str, str], now: float) -> None:
        """/metrics: the metrics token, the admin token or an admin key (the figures name
        every model and the traffic of each)."""
        token = bearer_token(headers.get("authorization"))
        if token is not None and _same_token(token, self._metrics_token):
            return
        await self.authenticate_admin(headers, now)

    async def _by_session(self, headers: Mapping[str, str], now: float) -> Principal | None:
        """The user of a login session cookie (OpenID Connect), or None without one. Like
        the proxy's header, a cookie comes with every request the browser sends, so the
        same cross-site checks apply."""
        token = session_cookie(headers) if self._sessions is not None else None
        if token is None or self._sessions is None:
            return None
        session = await self._sessions.lookup(token, now)
        if session is None:
            raise ApiError(
                401, "your login session is invalid or has expired: log in again",
                code="invalid_session",
            )  # fmt: skip
        problem = browser_problem(headers, self._origins)
        if problem is not None:
            raise ApiError(403, problem, code="cross_site_request")
        limits, budget = (
            self._config.user_limits,
            self._config.group_limits.get(session.group or ""),
        )
        return Principal(
            None, session.user, session.group, None, None, limits, session.admin, budget
        )

    async def _by_key(self, token: str, now: float) -> Principal:
        record = await self._cache.lookup(token, now)
        if record is None:
            raise ApiError(401, "invalid API key", code="invalid_api_key")
        problem = record.problem(now)
        if problem is not None:
            raise ApiError(401, problem, code="invalid_api_key")
        known = self._principals.get(record.id)
        if known is not None and known[0] is record:
            return known[1]
        if len(self._principals) >= 10_000:
            self._principals.clear()
        principal = self._principal(record)
        self._principals[record.id] = (record, principal)
        return principal

    def _principal(self, record: KeyRecord) -> Principal:
        return Principal(
            key_id=record.id,
            user=record.owner,
            group=record.group,
            allowed_models=record.allowed_models,
            key_limits=merge_limits(record.limits, self._config.default_key_limits),
            user_limits=self._config.user_limits,
            admin=record.admin,
            group_limits=self._config.group_limits.get(record.group or ""),
        )


MAX_IDENTITY = 200  # the width of the user and group columns of usage rows and keys


def _check_identity_length(user: str, group: str | None) -> None:
    """A name from the proxy's header that the database cannot store is refused here, with
    a clear answer, not on the request path's counter update (a database error, 500)."""
    for what, value in (("user", user), ("group", group or "")):
        if len(value) > MAX_IDENTITY:
            raise ApiError(
                400,
                f"the single-sign-on {what} name is longer than {MAX_IDENTITY} characters",
                code="invalid_identity",
            )
