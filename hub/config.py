"""The hub's configuration: one YAML file, validated at start.

Every problem becomes one line `FILE: KEY: REASON` (the same format as the agent's config).
Secrets never live here: upstream API keys and the admin token are named by environment
variable.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from hub.batch_config import BatchesConfig
from hub.endpoints import Endpoint
from hub.oidc_config import OidcConfig
from saia.base.config_file import (
    NO_FILE,
    ConfigError,
    Duration,
    Strict,
    read_yaml,
    validate,
)
from saia.base.tracing import TracingConfig

__all__ = [
    "AuthConfig",
    "ClientTimeoutsConfig",
    "ConfigError",
    "HooksConfig",
    "HpcSite",
    "HpcUpstreamConfig",
    "HubConfig",
    "LimitsConfig",
    "ModelConfig",
    "OidcConfig",
    "OpenAIUpstreamConfig",
    "SelfServiceConfig",
    "TimeoutsConfig",
    "load_config",
    "parse_config",
]

ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
ORIGIN = re.compile(r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?$")
MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")


class TimeoutsConfig(Strict):
    """Per-phase timeouts of one upstream; there is deliberately no total stream timeout."""

    connect: Duration = Field(10.0, gt=0)
    """connecting (TCP/TLS, or SSH to an HPC site); also bounds asking a site for its state"""
    first_byte: Duration = Field(
        300.0, gt=0, description="from sending the request until the response head arrives"
    )
    idle: Duration = Field(120.0, gt=0, description="longest gap between two chunks")


class AzureOptions(Strict):
    """An Azure OpenAI deployment: URLs become base_url/openai/deployments/DEPLOYMENT/..."""

    deployment: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")
    """the deployment name (a path segment of every request URL)"""
    api_version: str = Field(pattern=r"^[A-Za-z0-9._-]{1,32}$")
    """the api-version query parameter, e.g. 2024-06-01"""

    @field_validator("api_version", mode="before")
    @classmethod
    def _version(cls, value: Any) -> Any:
        # YAML reads an unquoted 2024-06-01 as a date.
        return value.isoformat() if isinstance(value, datetime.date) else value


class OpenAIUpstreamConfig(Strict):
    """Any OpenAI-compatible provider (or an Azure OpenAI deployment)."""

    kind: Literal["openai"]
    """selects this upstream type"""
    base_url: str = Field(description="e.g. https://api.openai.com/v1 (paths are appended)")
    api_key_env: str | None = Field(None, pattern=ENV_NAME)
    """environment variable holding the provider's key (Bearer; api-key for Azure)"""
    azure: AzureOptions | None = None
    """set for an Azure OpenAI deployment"""
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)
    """per-phase timeouts of requests to this provider"""
    usage_per_chunk: bool = Field(
        False,
        description="the provider is vLLM: ask for usage on every streamed chunk "
        "(continuous_usage_stats), so a client that leaves mid-stream pays for what was "
        "generated, prompt included",
    )

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^\s/]+", value):
            raise ValueError("expected an http:// or https:// URL")
        return value.rstrip("/")


class HpcSite(Strict):
    """One login node reached over SSH with the forced-command key."""

    host: str = Field("", description="the login node's address")
    port: int = Field(22, ge=1, le=65535, description="the login node's SSH port")
    user: str = Field("", description="the functional account whose key is forced")
    client_key: Path | None = Field(None, description="the hub's private key file")
    known_hosts: Path | None = Field(
        None, description="pinned host key(s) of the login node; checking is never off"
    )
    connections: int = Field(1, ge=1, le=16)
    """SSH connections kept open to this site; requests are multiplexed over them"""
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
    """selects this upstream type"""
    sites: list[HpcSite] = Field(min_length=1)
    """login nodes in order of preference: a request goes to the first reachable one"""
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)
    """per-phase timeouts of requests through the SSH hop"""
    services_ttl: Duration = Field(2.0, ge=0)
    """how long the agents' live model state (status, demand in /v1/models) is cached"""
    discover: bool = True
    """serve every service the agents report under its own id (models: entries override)"""


UpstreamConfig = Annotated[OpenAIUpstreamConfig | HpcUpstreamConfig, Field(discriminator="kind")]


class HooksConfig(Strict):
    """Request rewriting configured per model: no site-specific code."""

    system_prompt: str | None = None
    """prepended to chat requests as a system message"""
    max_tokens_cap: int | None = Field(None, ge=1)
    """cap on max_tokens / max_completion_tokens of completions; the default if none given"""
    defaults: dict[str, Any] = Field(default_factory=dict)
    """request fields set when the client leaves them out, e.g. {temperature: 0.7}"""


class ModelConfig(Strict):
    """One public model id and where it is served."""

    id: str
    """the public model id clients send (letters, digits and . _ : / @ + -)"""
    upstream: str
    """the key of an entry in upstreams that serves it"""
    upstream_model: str | None = None
    """the model name sent to the upstream (responses are renamed back to id); None: id"""
    name: str | None = None
    """display name in /v1/models; None: the agent's display name, else id"""
    owned_by: str = Field("saia", description="owned_by in /v1/models")
    created: int = Field(0, ge=0, description="created in /v1/models (Unix time)")
    input: list[str] | None = None
    """input modalities in /v1/models, e.g. [text, image]; None: the agent's, else [text]"""
    output: list[str] | None = None
    """output modalities in /v1/models, e.g. [text, thought]; None: the agent's, else [text]"""
    endpoints: list[Endpoint] | None = None
    """endpoints served (others: 404), in /v1/models; None: the agent's, else DEFAULT_ENDPOINTS"""
    hooks: HooksConfig = Field(default_factory=HooksConfig)
    """request rewriting for this model"""

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
    """requests per UTC minute (fixed window, shared by all hub replicas)"""
    requests_per_hour: int | None = Field(None, ge=0)
    """requests per UTC hour"""
    requests_per_day: int | None = Field(None, ge=0)
    """requests per UTC day"""
    requests_per_month: int | None = Field(None, ge=0)
    """requests per calendar month (UTC)"""
    tokens_per_day: int | None = Field(None, ge=0)
    """prompt + completion tokens per UTC day; a request is refused once it is used up"""
    tokens_per_month: int | None = Field(None, ge=0)
    """prompt + completion tokens per calendar month (UTC)"""
    concurrent: int | None = Field(None, ge=1, description="in-flight requests (per replica)")


class AuthConfig(Strict):
    """API keys, and optionally identity from a trusted reverse proxy (the web front end)."""

    key_cache_ttl: Duration = Field(5.0, ge=0)
    """how long a looked-up key is cached: revocation takes effect within it"""
    proxy_user_header: str | None = Field(None, pattern=r"^[A-Za-z0-9-]{1,64}$")
    """header naming the user, believed only from trusted_proxies (requests without a key)"""
    proxy_group_header: str | None = Field(None, pattern=r"^[A-Za-z0-9-]{1,64}$")
    """header naming that user's group (from the same trusted proxies)"""
    trusted_proxies: list[str] = Field(default_factory=list)
    """networks (CIDRs) of the reverse proxies whose user headers are believed"""
    default_key_limits: LimitsConfig = Field(default_factory=LimitsConfig)
    """a key's limits where the key itself sets none"""
    user_limits: LimitsConfig = Field(default_factory=LimitsConfig)
    """limits per user: all of a user's keys and proxy logins together"""
    group_limits: dict[str, LimitsConfig] = Field(default_factory=dict)
    """budget per group, shared by all its users and keys (windows and headers as a key's)"""
    admin_token_env: str | None = Field("SAIA_HUB_ADMIN_TOKEN", pattern=ENV_NAME)
    """environment variable holding the admin API token (16+ chars); unset: admin keys only"""
    metrics_token_env: str | None = Field(
        None,
        pattern=ENV_NAME,
        description="environment variable holding a token (16+ chars) that may read /metrics "
        "and nothing else; unset: /metrics needs the admin token or an admin key",
    )
    allowed_origins: list[str] = Field(
        default_factory=list,
        description="web origins (https://host[:port]) besides the hub's own (its Host "
        "header) whose browser requests may act for a proxy-identified user (CSRF guard)",
    )

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            if not ORIGIN.match(origin):
                raise ValueError(f"{origin!r} is not an origin such as https://chat.example.org")
        return [origin.lower() for origin in value]

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
        if self.proxy_group_header and not self.proxy_user_header:
            # A group is believed only together with a user named by a trusted proxy.
            raise ValueError("proxy_group_header needs proxy_user_header")
        return self


class SelfServiceConfig(Strict):
    """What logged-in users may do on the self-service page (/account/)."""

    keys_per_user: int = Field(5, ge=0)
    """active keys a user may hold at once (0: users create no keys themselves)"""
    key_limits: LimitsConfig = Field(default_factory=LimitsConfig)
    """limits of a key a user creates (auth.default_key_limits fill the rest)"""
    key_lifetime_days: float | None = Field(365.0, gt=0)
    """a self-made key expires after this many days; None: never"""


class ClientTimeoutsConfig(Strict):
    """How long a client may take to send its request; the answer has no total bound.

    Slow senders must not hold connections (and the tasks waiting for their bodies)."""

    head: Duration = Field(
        10.0,
        gt=0,
        description="from a connection's opening, or a request's first byte, until the "
        "request line and headers are complete; the connection is closed after it",
    )
    body_idle: Duration = Field(10.0, gt=0)
    """longest gap between two pieces of a request body (408 after it)"""
    body: Duration = Field(60.0, gt=0)
    """longest time to receive a whole request body (408 after it)"""


class HubConfig(Strict):
    """The whole hub configuration file."""

    host: str = Field("127.0.0.1", description="address `saia hub serve` listens on")
    port: int = Field(8000, ge=0, le=65535, description="port `saia hub serve` listens on")
    data_dir: Path = Path("hub-data")
    """the hub's files (the default SQLite database); relative to this config file"""
    database_url: str | None = None
    """SQLAlchemy async URL, e.g. postgresql+asyncpg://...; default: SQLite in data_dir"""
    database_url_env: str | None = Field(
        "SAIA_HUB_DATABASE_URL",
        pattern=ENV_NAME,
        description="environment variable whose URL, when set, replaces database_url "
        "(containers keep the database password out of the file)",
    )
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    """largest request body accepted (413 beyond)"""
    usage_flush_interval: Duration = Field(1.0, gt=0, le=60)
    """usage records are written to the database at least this often"""
    counter_sync_interval: Duration = Field(
        0.5,
        ge=0,
        le=60,
        description="rate-limit windows are counted in memory and shared with the other "
        "replicas this often (bounded overshoot: docs/operations.md, Rate limits across "
        "replicas); 0: every request counted in the database (exact, a round trip each)",
    )
    max_connections: int = Field(512, ge=1, description="pooled upstream HTTP connections")
    upstreams: dict[str, UpstreamConfig] = Field(default_factory=dict)
    """where models are served, by a name models refer to"""
    models: list[ModelConfig] = Field(default_factory=list)
    """the public models"""
    auth: AuthConfig = Field(default_factory=AuthConfig)
    """API keys, proxy identity and limits"""
    oidc: OidcConfig = Field(default_factory=OidcConfig)
    """login with an OpenID Connect provider (the self-service page and the dashboard)"""
    self_service: SelfServiceConfig = Field(default_factory=SelfServiceConfig)
    """what logged-in users may do with their own keys"""
    client_timeouts: ClientTimeoutsConfig = Field(default_factory=ClientTimeoutsConfig)
    """bounds on how slowly clients may send their requests"""
    batches: BatchesConfig = Field(default_factory=BatchesConfig)
    """the Files and Batches API: batch inference as Slurm jobs"""
    api_docs: bool = False
    """serve the interactive API docs (/docs, /redoc, /openapi.json) to anyone; off: 404"""
    tracing: TracingConfig | None = None
    """OpenTelemetry traces of proxied requests, sent to an OTLP/HTTP collector; off if absent"""

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

    def docs_urls(self) -> dict[str, str | None]:
        """FastAPI's docs settings: the URLs when api_docs is on, None (not served) when off."""
        on = self.api_docs
        return {
            "docs_url": "/docs" if on else None,
            "redoc_url": "/redoc" if on else None,
            "openapi_url": "/openapi.json" if on else None,
        }

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir / 'hub.db'}"


def parse_config(data: Any, source: Path | str = NO_FILE) -> HubConfig:
    # Every hub setting has a default: an empty file is a valid config.
    return validate(HubConfig, {} if data is None else data, source, relative_paths=("data_dir",))


def load_config(path: Path | str, environ: Mapping[str, str] | None = None) -> HubConfig:
    """The file's config, with the database URL from the environment where it is set."""
    config = parse_config(read_yaml(Path(path)), Path(path))
    return with_environment(config, os.environ if environ is None else environ)


def with_environment(config: HubConfig, environ: Mapping[str, str]) -> HubConfig:
    name = config.database_url_env
    url = environ.get(name, "").strip() if name else ""
    return config.model_copy(update={"database_url": url}) if url else config
