"""The `oidc` section of the hub's config: login with an OpenID Connect provider."""

from __future__ import annotations

import re

from pydantic import Field, field_validator, model_validator

from saia.base.config_file import Duration, Strict

ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


class OidcConfig(Strict):
    """Login with an OpenID Connect provider (code flow with PKCE); off unless issuer is set.

    The campus IdP, an eduGAIN proxy, Keycloak...: see docs/login.md."""

    issuer: str | None = None
    """the provider's issuer URL; its /.well-known/openid-configuration is read at login"""
    client_id: str = ""
    """this hub's client id at the provider"""
    client_secret_env: str | None = Field(None, pattern=ENV_NAME)
    """environment variable holding the client secret (unset: a public client, PKCE only)"""
    session_secret_env: str = Field("SAIA_HUB_SESSION_SECRET", pattern=ENV_NAME)
    """environment variable holding 32+ characters that sign the short-lived login cookie"""
    redirect_url: str | None = Field(
        None,
        description="the callback URL registered at the provider (https://HUB/auth/callback);"
        " None: from the request's own URL",
    )
    scopes: list[str] = Field(default_factory=lambda: ["openid", "profile", "email"])
    """scopes requested; `openid` is required"""
    user_claim: str = Field("sub", min_length=1, max_length=100)
    """the ID token claim naming the user (e.g. eduperson_principal_name, email)"""
    group_claim: str | None = Field(None, min_length=1, max_length=100)
    """the claim listing the user's groups (a string or a list), e.g. groups"""
    group_map: dict[str, str] = Field(
        default_factory=dict,
        description="claim value -> hub group; empty: the claim's values are the hub's "
        "groups as they are, otherwise values not listed are ignored",
    )
    admin_group: str | None = None
    """members of this hub group see the operator dashboard and the admin API"""
    session_lifetime: Duration = Field(8 * 3600.0, gt=0)
    """how long a login lasts (the session cookie's lifetime)"""
    timeout: Duration = Field(10.0, gt=0)
    """bound on each call to the provider (discovery, keys, token)"""
    provider_logout: bool = Field(
        True,
        description="logging out of the hub also ends the login at the provider (OpenID "
        "Connect RP-initiated logout, where its discovery names an end_session_endpoint; "
        "register <hub>/account/ there as a post-logout redirect URI); false: only the "
        "hub's session ends, and the next login may pass the provider without a prompt",
    )

    @field_validator("issuer", "redirect_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^\s/]+", value):
            raise ValueError("expected an http:// or https:// URL")
        return value.rstrip("/") if value else value

    @model_validator(mode="after")
    def _complete(self) -> OidcConfig:
        if self.issuer and not self.client_id:
            raise ValueError("an issuer needs the client_id registered there")
        if "openid" not in self.scopes:
            raise ValueError("scopes must include openid")
        return self

    @property
    def enabled(self) -> bool:
        return self.issuer is not None
