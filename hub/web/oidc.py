"""Login with an OpenID Connect provider: authorization code flow with PKCE (Authlib).

`/auth/login` redirects to the provider (discovered from its issuer URL) with a state,
a nonce and a PKCE challenge, kept in a short-lived signed cookie `saia_login` (path /auth)
until `/auth/callback`, where Authlib exchanges the code and checks the ID token (signature
from the provider's keys, issuer, audience, expiry, nonce). The hub then starts its own
session (`hub.sessions`): an HttpOnly, SameSite=Strict cookie, Secure behind TLS. The ID
token's claims name the user (`user_claim`) and their groups (`group_claim`, `group_map`).
`POST /auth/logout` ends it, and names the provider's end-session URL for the page to
visit next (RP-initiated logout; `oidc.provider_logout`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlencode

import httpx
from authlib.integrations.starlette_client import (  # type: ignore[import-untyped]
    OAuth,
    OAuthError,
)
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from hub.auth import MAX_IDENTITY, browser_problem
from hub.config import ConfigError, HubConfig
from hub.errors import ApiError
from hub.oidc_config import OidcConfig
from hub.services import HubServices
from hub.sessions import COOKIE, SessionStore, WebSession, session_cookie

log = logging.getLogger(__name__)
# Authlib logs the PKCE verifier at DEBUG: never let a debug setting print it.
logging.getLogger("authlib").setLevel(logging.INFO)

LOGIN_COOKIE = "saia_login"
LOGIN_WINDOW = 600  # seconds a user has at the provider before the login must start again
PAGES = ("/account/", "/dashboard/", "/chat/")  # where a login may return to


def check_secrets(oidc: OidcConfig, environ: Mapping[str, str]) -> tuple[str, str | None]:
    """The login cookie's signing secret and the client secret, from the environment."""
    secret = environ.get(oidc.session_secret_env, "")
    if len(secret) < 32:
        raise ConfigError(
            f"environment variable {oidc.session_secret_env}: OpenID Connect login needs "
            "a secret of 32+ characters to sign its login cookie"
        )
    client_secret = None
    if oidc.client_secret_env:
        client_secret = environ.get(oidc.client_secret_env)
        if not client_secret:
            raise ConfigError(f"environment variable {oidc.client_secret_env} is not set")
    return secret, client_secret


def claim_groups(claims: Mapping[str, Any], oidc: OidcConfig) -> list[str]:
    """The hub groups named by the group claim (a string or a list), in the claim's order."""
    value = claims.get(oidc.group_claim) if oidc.group_claim else None
    values = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    names = [str(item) for item in values if isinstance(item, str | int)]
    if oidc.group_map:
        names = [oidc.group_map[name] for name in names if name in oidc.group_map]
    return [name for name in names if name]


def session_of(claims: Mapping[str, Any], oidc: OidcConfig, now: float) -> WebSession:
    """Who the checked ID token names, as a hub session (ApiError if it names no one)."""
    user = claims.get(oidc.user_claim)
    if not isinstance(user, str) or not user.strip():
        raise ApiError(403, f"the login provider sent no `{oidc.user_claim}` claim")
    groups = claim_groups(claims, oidc)
    group = groups[0] if groups else None
    if len(user) > MAX_IDENTITY or len(group or "") > MAX_IDENTITY:
        raise ApiError(400, "the user or group name is too long", code="invalid_identity")
    admin = oidc.admin_group is not None and oidc.admin_group in groups
    return WebSession(user.strip(), group, admin, now + oidc.session_lifetime)


class Login:
    """The /auth routes; `services` gives the running hub's services (set by its lifespan)."""

    def __init__(
        self, config: HubConfig, environ: Mapping[str, str], services: Callable[[], HubServices]
    ) -> None:
        self._oidc = config.oidc
        self._origins = frozenset(config.auth.allowed_origins)
        self.signing_secret, client_secret = check_secrets(self._oidc, environ)
        self._services = services
        oauth = OAuth()
        assert self._oidc.issuer is not None
        self.client: Any = oauth.register(
            "provider",
            client_id=self._oidc.client_id,
            client_secret=client_secret,
            server_metadata_url=f"{self._oidc.issuer}/.well-known/openid-configuration",
            client_kwargs={
                "scope": " ".join(self._oidc.scopes),
                "code_challenge_method": "S256",
                "timeout": self._oidc.timeout,
                # A public client (no secret) proves itself with PKCE alone.
                "token_endpoint_auth_method": "client_secret_basic" if client_secret else "none",
            },
        )

    def _store(self) -> SessionStore:
        store = self._services().sessions
        assert store is not None  # the hub opens it whenever oidc is on
        return store

    def _secure(self, request: Request) -> bool:
        return request.url.scheme == "https" or (self._oidc.redirect_url or "").startswith("https:")

    async def login(self, request: Request) -> Response:
        wanted = request.query_params.get("next", PAGES[0])
        request.session.clear()
        request.session["next"] = wanted if wanted in PAGES else PAGES[0]
        here = request.url  # .../auth/login, under any prefix the hub is mounted at
        redirect = self._oidc.redirect_url or str(
            here.replace(path=here.path.rsplit("/", 1)[0] + "/callback", query="")
        )
        try:
            async with asyncio.timeout(self._oidc.timeout * 2):
                answer: Response = await self.client.authorize_redirect(request, redirect)
                return answer
        except (httpx.HTTPError, TimeoutError, OAuthError, ValueError) as error:
            log.warning("login: the provider's discovery failed: %s", type(error).__name__)
            return _error(502, "the login provider cannot be reached; try again later")

    async def callback(self, request: Request) -> Response:
        try:
            async with asyncio.timeout(self._oidc.timeout * 3):
                token = await self.client.authorize_access_token(request)
        except OAuthError as error:
            # error.error is the provider's or Authlib's code (mismatching_state, ...)
            log.info("login refused: %s", error.error)
            return _error(400, f"login failed ({error.error}); start again from the page")
        except (httpx.HTTPError, TimeoutError, ValueError) as error:
            log.warning("login: the provider's token exchange failed: %s", type(error).__name__)
            return _error(502, "the login provider did not answer; try again later")
        claims = token.get("userinfo") or {}
        now = time.time()
        try:
            session = session_of(claims, self._oidc, now)
            cookie = await self._store().create(session, now)
        except ApiError as error:
            return error.response()
        log.info("login: %s (group %s, admin %s)", session.user, session.group, session.admin)
        target = request.session.pop("next", PAGES[0])
        response = RedirectResponse(target if target in PAGES else PAGES[0], status_code=303)
        response.set_cookie(
            COOKIE, cookie, max_age=int(self._oidc.session_lifetime), path="/",
            httponly=True, secure=self._secure(request), samesite="strict",
        )  # fmt: skip
        return response

    async def logout(self, request: Request) -> Response:
        problem = browser_problem(request.headers, self._origins)
        if problem is not None:
            return _error(403, problem, "cross_site_request")
        token = session_cookie(request.headers)
        if token is not None:
            try:
                await self._store().delete(token)
            except ApiError as error:
                return error.response()
        answer: dict[str, Any] = {"logged_out": True}
        provider = await self._provider_logout(request) if self._oidc.provider_logout else None
        if provider is not None:
            answer["provider_logout_url"] = provider  # the page goes there next
        response = JSONResponse(answer)
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return response

    async def _provider_logout(self, request: Request) -> str | None:
        """Where the browser ends its login at the provider (RP-initiated logout), coming
        back to the account page; None if the provider has no end_session_endpoint or its
        discovery fails (the hub's own session is ended either way)."""
        try:
            async with asyncio.timeout(self._oidc.timeout * 2):
                metadata = await self.client.load_server_metadata()
        except (httpx.HTTPError, TimeoutError, OAuthError, ValueError) as error:
            log.warning("logout: the provider's discovery failed: %s", type(error).__name__)
            return None
        endpoint = metadata.get("end_session_endpoint")
        if not isinstance(endpoint, str) or not endpoint.startswith(("https://", "http://")):
            return None
        if self._oidc.redirect_url:
            base = self._oidc.redirect_url.rsplit("/auth/", 1)[0]
        else:
            here = request.url  # .../auth/logout, under any prefix the hub is mounted at
            base = str(here.replace(path=here.path.rsplit("/auth/", 1)[0], query=""))
        query = {"client_id": self._oidc.client_id, "post_logout_redirect_uri": f"{base}{PAGES[0]}"}
        return f"{endpoint}{'&' if '?' in endpoint else '?'}{urlencode(query)}"


def _error(status: int, message: str, code: str | None = None) -> Response:
    return ApiError(status, message, code=code).response()


def login_app(
    config: HubConfig, environ: Mapping[str, str], services: Callable[[], HubServices]
) -> Starlette:
    """The app mounted at /auth (only when `oidc.issuer` is set)."""
    login = Login(config, environ, services)
    secure = (config.oidc.redirect_url or "").startswith("https:")
    middleware = Middleware(
        SessionMiddleware, secret_key=login.signing_secret, session_cookie=LOGIN_COOKIE,
        max_age=LOGIN_WINDOW, path="/auth", same_site="lax", https_only=secure,
    )  # fmt: skip
    routes = [
        Route("/login", login.login, methods=["GET"]),
        Route("/callback", login.callback, methods=["GET"]),
        Route("/logout", login.logout, methods=["POST"]),
    ]
    return Starlette(routes=routes, middleware=[middleware])
