"""The people's side of the hub: OpenID Connect login (/auth), the self-service API (/me)
and its page (/account/), and the operator dashboard's page (/dashboard/; its data comes
from the admin API)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from hub.config import HubConfig
from hub.services import HubServices
from hub.web.selfservice import selfservice_router

STATIC = Path(__file__).parent.parent / "static"  # hub/static/


def add_pages(app: FastAPI, config: HubConfig, environ: Mapping[str, str]) -> None:
    def services() -> HubServices:
        running: HubServices = app.state.services
        return running

    app.include_router(selfservice_router())
    if config.oidc.enabled:
        from hub.web.oidc import login_app  # Authlib is loaded only by hubs that log people in

        app.mount("/auth", login_app(config, environ, services), name="auth")
    for page in ("account", "dashboard"):
        if (STATIC / page).is_dir():
            app.mount(f"/{page}", StaticFiles(directory=STATIC / page, html=True), name=page)
