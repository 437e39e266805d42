"""Who is calling: an API key, or a user named by a trusted reverse proxy."""

from __future__ import annotations

import functools
import hmac
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

from hub.config import AuthConfig, LimitsConfig
from hub.errors import ApiError
from hub.key_store import KeyCache, KeyRecord


@dataclass(frozen=True)
class Principal:
    key_id: str | None
    user: str | None
    group: str | None
    allowed_models: tuple[str, ...] | None
    key_limits: LimitsConfig | None
    user_limits: LimitsConfig
    admin: bool = False

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


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class Authenticator:
    def __init__(self, config: AuthConfig, cache: KeyCache, admin_token: str | None) -> None:
        self._config = config
        self._cache = cache
        self._admin_token = admin_token
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
        header = self._config.proxy_user_header
        if header and self._trusted(client_host):
            user = headers.get(header.lower(), "").strip()
            if user:
                group = self._group(headers)
                return Principal(None, user, group, None, None, self._config.user_limits)
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
            raise ApiError(401, "missing admin token", code="missing_api_key")
        if self._admin_token and hmac.compare_digest(token, self._admin_token):
            return Principal(None, "admin", None, None, None, self._config.user_limits, True)
        principal = await self._by_key(token, now)
        if not principal.admin:
            raise ApiError(403, "this key is not an admin key", code="not_admin")
        return principal

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
        )
