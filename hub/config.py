"""The hub's configuration: one YAML file, validated at start.

Every problem becomes one line `FILE: KEY: REASON` (the same format as the agent's config).
Secrets never live here: upstream API keys and the admin token are named by environment
variable.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from saia.config_file import (
    NO_FILE,
    ConfigError,
    Duration,
    Strict,
    read_yaml,
    resolve_relative,
    validate,
)

__all__ = [
    "AuthConfig",
    "ConfigError",
    "HooksConfig",
    "HpcSite",
    "HpcUpstreamConfig",
    "HubConfig",
    "LimitsConfig",
    "ModelConfig",
    "OpenAIUpstreamConfig",
    "TimeoutsConfig",
    "load_config",
    "parse_config",
]

ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")


class TimeoutsConfig(Strict):
    """Per-phase timeouts of one upstream; there is deliberately no total stream timeout."""

    connect: Duration = Field(10.0, gt=0)
    first_byte: Duration = Field(300.0, gt=0, description="until the response head arrives")
    idle: Duration = Field(120.0, gt=0, description="longest gap between two chunks")


class AzureOptions(Strict):
    deployment: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")
    api_version: str = Field(pattern=r"^[A-Za-z0-9._-]{1,32}$")

    @field_validator("api_version", mode="before")
    @classmethod
    def _version(cls, value: Any) -> Any:
        # YAML reads an unquoted 2024-06-01 as a date.
        return value.isoformat() if isinstance(value, datetime.date) else value


class OpenAIUpstreamConfig(Strict):
    """Any OpenAI-compatible provider (or an Azure OpenAI deployment)."""

    kind: Literal["openai"]
    base_url: str = Field(description="e.g. https://api.openai.com/v1 (paths are appended)")
    api_key_env: str | None = Field(None, pattern=ENV_NAME)
    azure: AzureOptions | None = None
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^\s/]+", value):
            raise ValueError("expected an http:// or https:// URL")
        return value.rstrip("/")


class HpcSite(Strict):
    """One login node reached over SSH with the forced-command key."""

    host: str = Field("", description="the login node's address")
    port: int = Field(22, ge=1, le=65535)
    user: str = Field("", description="the functional account whose key is forced")
    client_key: Path | None = Field(None, description="the hub's private key file")
    known_hosts: Path | None = Field(
        None, description="pinned host key(s) of the login node; checking is never off"
    )
    connections: int = Field(1, ge=1, le=16)
    socket: Path | None = Field(
        None,
        description="the agent's Unix socket on this same machine instead of SSH "
        "(only for a demo without sshd)",
    )

    @model_validator(mode="after")
    def _reachable(self) -> HpcSite:
        if self.socket is None:
            missing = [
                k for k in ("host", "user", "client_key", "known_hosts") if not getattr(self, k)
            ]
            if missing:
                raise ValueError(f"an SSH site needs {', '.join(missing)}")
        return self


class HpcUpstreamConfig(Strict):
    """Models served by saia agents on one or more HPC sites (failover in order)."""

    kind: Literal["hpc"]
    sites: list[HpcSite] = Field(min_length=1)
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)
    services_ttl: Duration = Field(2.0, ge=0, description="cache of the agents' live state")


UpstreamConfig = Annotated[OpenAIUpstreamConfig | HpcUpstreamConfig, Field(discriminator="kind")]


class HooksConfig(Strict):
    """Request rewriting configured per model: no site-specific code."""

    system_prompt: str | None = Field(None, description="prepended as a system message")
    max_tokens_cap: int | None = Field(None, ge=1)
    defaults: dict[str, Any] = Field(default_factory=dict, description="set when absent")


class ModelConfig(Strict):
    """One public model id and where it is served."""

    id: str
    upstream: str
    upstream_model: str | None = Field(None, description="the upstream's name (aliasing)")
    name: str | None = None
    owned_by: str = "saia"
    created: int = Field(0, ge=0)
    input: list[str] = Field(default_factory=lambda: ["text"])
    output: list[str] = Field(default_factory=lambda: ["text"])
    hooks: HooksConfig = Field(default_factory=HooksConfig)

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not MODEL_ID.match(value):
            raise ValueError("use letters, digits and . _ : / @ + - (at most 128)")
        return value

    @property
    def target(self) -> str:
        return self.upstream_model or self.id


class LimitsConfig(Strict):
    """Limits of one key or user; None means unlimited."""

    requests_per_minute: int | None = Field(None, ge=0)
    requests_per_hour: int | None = Field(None, ge=0)
    requests_per_day: int | None = Field(None, ge=0)
    requests_per_month: int | None = Field(None, ge=0)
    tokens_per_day: int | None = Field(None, ge=0)
    tokens_per_month: int | None = Field(None, ge=0)
    concurrent: int | None = Field(None, ge=1, description="in-flight requests (per replica)")


class AuthConfig(Strict):
    """API keys, and optionally identity from a trusted reverse proxy (the web front end)."""

    key_cache_ttl: Duration = Field(5.0, ge=0, description="revocation takes effect within it")
    proxy_user_header: str | None = Field(None, pattern=r"^[A-Za-z0-9-]{1,64}$")
    proxy_group_header: str | None = Field(None, pattern=r"^[A-Za-z0-9-]{1,64}$")
    trusted_proxies: list[str] = Field(default_factory=list, description="CIDRs")
    default_key_limits: LimitsConfig = Field(default_factory=LimitsConfig)
    user_limits: LimitsConfig = Field(default_factory=LimitsConfig, description="per user")
    admin_token_env: str | None = Field("SAIA_HUB_ADMIN_TOKEN", pattern=ENV_NAME)

    @field_validator("trusted_proxies")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"{cidr!r} is not an IP network such as 10.0.0.0/8") from None
        return value

    @model_validator(mode="after")
    def _proxy(self) -> AuthConfig:
        if self.proxy_user_header and not self.trusted_proxies:
            raise ValueError("proxy_user_header needs trusted_proxies (the proxies' addresses)")
        return self


class HubConfig(Strict):
    """The whole hub configuration file."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    data_dir: Path = Path("hub-data")
    database_url: str | None = Field(None, description="default: SQLite in data_dir")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    usage_flush_interval: Duration = Field(1.0, gt=0, le=60)
    max_connections: int = Field(512, ge=1, description="pooled upstream HTTP connections")
    upstreams: dict[str, UpstreamConfig] = Field(default_factory=dict)
    models: list[ModelConfig] = Field(default_factory=list)
    auth: AuthConfig = Field(default_factory=AuthConfig)

    @model_validator(mode="after")
    def _references(self) -> HubConfig:
        seen: set[str] = set()
        for model in self.models:
            if model.id in seen:
                raise ValueError(f"model id {model.id!r} is configured twice")
            seen.add(model.id)
            if model.upstream not in self.upstreams:
                raise ValueError(f"model {model.id!r}: unknown upstream {model.upstream!r}")
        return self

    def model(self, model_id: str) -> ModelConfig | None:
        for model in self.models:
            if model.id == model_id:
                return model
        return None

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir / 'hub.db'}"


def parse_config(data: Any, source: Path | str = NO_FILE) -> HubConfig:
    # Every hub setting has a default: an empty file is a valid config.
    config = validate(HubConfig, {} if data is None else data, source)
    data_dir = resolve_relative(config.data_dir, source)
    if data_dir != config.data_dir:
        config = config.model_copy(update={"data_dir": data_dir})
    return config


def load_config(path: Path | str) -> HubConfig:
    return parse_config(read_yaml(Path(path)), Path(path))
