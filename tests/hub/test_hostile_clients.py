"""The hub's doors against hostile clients: cross-site requests in a single-sign-on user's
name, odd tokens, unauthenticated metrics and docs, keys that list other than they enforce,
group headers from clients.

Requests whose meaning is in their headers on the wire (CSRF) go to a real uvicorn hub;
the others to the app through httpx's ASGI transport (its lifespan entered, so the
services are the real ones on SQLite)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from hub.app import create_app
from hub.config import ConfigError, HubConfig, parse_config
from hub.services import HubServices
from tests.fixtures.standin import STANDIN_MODEL
from tests.hub.helpers import ADMIN_TOKEN, hub_config, running_hub
from tests.hub.test_api import recorded_rows, usage_rows

SSO = {
    "proxy_user_header": "X-Forwarded-User",
    "proxy_group_header": "X-Forwarded-Groups",
    "trusted_proxies": ["127.0.0.1/32"],
}
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
METRICS_TOKEN = "metrics-token-for-tests-012345"
DOCS = Path(__file__).resolve().parents[2] / "docs"


@asynccontextmanager
async def asgi_hub(
    config: HubConfig, environ: dict[str, str] | None = None
) -> AsyncIterator[tuple[httpx.AsyncClient, HubServices]]:
    app = create_app(config, {"SAIA_HUB_ADMIN_TOKEN": ADMIN_TOKEN, **(environ or {})})
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://hub.test") as http:
            yield http, app.state.services


def offline_config(tmp_path: Path, **extra: Any) -> HubConfig:
    """A hub whose one model is never asked (nothing listens on port 9)."""
    return hub_config(tmp_path, "http://127.0.0.1:9", "m", **extra)


def completion() -> bytes:
    return json.dumps({"model": STANDIN_MODEL, "prompt": "a", "max_tokens": 1}).encode()


def assert_refused(response: httpx.Response, status: int, code: str | None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and "type" in error


# 1. Cross-site request forgery under single sign-on -------------------------------------

FORGED = {
    # An HTML form with enctype=text/plain on another site, in a current browser.
    "text/plain form": {
        "content-type": "text/plain",
        "origin": "https://evil.example",
        "sec-fetch-site": "cross-site",
    },
    # The same form from a browser that sends neither Origin nor Sec-Fetch-Site.
    "text/plain, no marks": {"content-type": "text/plain"},
    "urlencoded form": {"content-type": "application/x-www-form-urlencoded"},
    "json from another origin": {
        "content-type": "application/json",
        "origin": "https://evil.example",
    },
    "json, cross-site": {"content-type": "application/json", "sec-fetch-site": "cross-site"},
    "json, a sibling site": {
        "content-type": "application/json",
        "origin": "https://other.example",
        "sec-fetch-site": "same-site",
    },
    "json, opaque origin": {"content-type": "application/json", "origin": "null"},
    "json, malformed origin": {"content-type": "application/json", "origin": "http://["},
}


async def test_a_cross_site_request_cannot_act_as_the_sso_user(
    tmp_path: Path, standin_server: str
) -> None:
    config = hub_config(tmp_path, standin_server, STANDIN_MODEL, auth=SSO)
    async with running_hub(config) as hub, hub.client() as http:
        victim = {"x-forwarded-user": "victim", "x-forwarded-groups": "staff"}
        forged = {
            name: await http.post("/v1/completions", content=completion(), headers=victim | h)
            for name, h in FORGED.items()
        }
        listing = await http.get("/v1/models", headers=victim | {"sec-fetch-site": "cross-site"})
        # What the chat page sends under single sign-on: JSON from the hub's own origin.
        page = {"content-type": "application/json", "sec-fetch-site": "same-origin"}
        page_post = await http.post(
            "/v1/completions", content=completion(), headers=victim | page | {"origin": hub.url}
        )
        page_list = await http.get("/v1/models", headers=victim | page)
        # An API key is not sent by a browser on its own: key requests are unaffected.
        key = await hub.create_key(owner="keyholder")
        keyed = await http.post(
            "/v1/completions",
            content=completion(),
            headers=FORGED["text/plain form"] | {"authorization": f"Bearer {key}"},
        )
        await recorded_rows(hub, 2)
        rows = await usage_rows(hub)  # all of them, once the two expected are there
    for name, response in forged.items():
        assert response.status_code == 403, f"{name}: {response.status_code}"
        assert_refused(response, 403, "cross_site_request")
    assert_refused(listing, 403, "cross_site_request")
    assert page_post.status_code == 200 and page_list.status_code == 200
    assert keyed.status_code == 200
    # Nothing was served, or charged, in the victim's name but the page's own request.
    assert sorted((row["user_name"], row["status"]) for row in rows) == [
        ("keyholder", 200),
        ("victim", 200),
    ]


async def test_allowed_origins_may_act_for_the_sso_user(
    tmp_path: Path, standin_server: str
) -> None:
    auth = SSO | {"allowed_origins": ["https://Chat.Example.org"]}
    config = hub_config(tmp_path, standin_server, STANDIN_MODEL, auth=auth)
    sso = {"x-forwarded-user": "alice", "content-type": "application/json"}
    async with running_hub(config) as hub, hub.client() as http:
        allowed = await http.post(
            "/v1/completions",
            content=completion(),
            headers=sso | {"origin": "https://chat.example.org", "sec-fetch-site": "cross-site"},
        )
        other = await http.post(
            "/v1/completions", content=completion(), headers=sso | {"origin": "https://x.org"}
        )
    assert allowed.status_code == 200, allowed.text
    assert_refused(other, 403, "cross_site_request")


def test_allowed_origins_must_be_origins() -> None:
    with pytest.raises(ConfigError, match=r"allowed_origins.*is not an origin"):
        parse_config({"auth": SSO | {"allowed_origins": ["https://chat.example.org/path"]}})


# 2. Tokens that are not ASCII -------------------------------------------------------------


async def test_a_non_ascii_token_is_refused_not_an_error(tmp_path: Path) -> None:
    token = {"authorization": "Bearer sk-saia-é€".encode()}
    async with asgi_hub(offline_config(tmp_path)) as (http, _services):
        answers = {
            path: await http.get(path, headers=token)
            for path in ("/admin/keys", "/metrics", "/v1/models")
        }
    for answer in answers.values():
        assert_refused(answer, 401, "invalid_api_key")


# 3. Metrics and API docs ------------------------------------------------------------------


async def test_metrics_need_the_metrics_or_admin_token(tmp_path: Path) -> None:
    config = offline_config(tmp_path, auth={"metrics_token_env": "SAIA_HUB_METRICS_TOKEN"})
    environ = {"SAIA_HUB_METRICS_TOKEN": METRICS_TOKEN}
    metrics = {"authorization": f"Bearer {METRICS_TOKEN}"}
    async with asgi_hub(config, environ) as (http, services):
        _record, key = await services.keys.create(name="user", now=0.0)
        user = {"authorization": f"Bearer {key.secret}"}
        anonymous = await http.get("/metrics")
        by_user = await http.get("/metrics", headers=user)
        by_admin = await http.get("/metrics", headers=ADMIN)
        by_scraper = await http.get("/metrics", headers=metrics)
        scraper_elsewhere = [
            await http.get(path, headers=metrics) for path in ("/admin/keys", "/v1/models")
        ]
    assert_refused(anonymous, 401, "missing_api_key")
    assert_refused(by_user, 403, "not_admin")
    for answer in (by_admin, by_scraper):
        assert answer.status_code == 200 and "saia_hub_requests" in answer.text
    for answer in scraper_elsewhere:
        assert_refused(answer, 401, "invalid_api_key")


def test_a_short_metrics_token_is_refused_at_start(tmp_path: Path) -> None:
    config = offline_config(tmp_path, auth={"metrics_token_env": "SAIA_HUB_METRICS_TOKEN"})
    with pytest.raises(ConfigError, match="SAIA_HUB_METRICS_TOKEN: the metrics token needs"):
        create_app(config, {"SAIA_HUB_METRICS_TOKEN": "short"})


async def test_api_docs_are_served_only_when_configured(tmp_path: Path) -> None:
    paths = ("/docs", "/redoc", "/openapi.json")
    async with asgi_hub(offline_config(tmp_path / "off")) as (http, _services):
        off = [await http.get(path) for path in paths]
    async with asgi_hub(offline_config(tmp_path / "on", api_docs=True)) as (http, _services):
        on = [await http.get(path) for path in paths]
    for answer in off:
        assert_refused(answer, 404, None)
    assert [answer.status_code for answer in on] == [200, 200, 200]
    # The proxied routes, answered outside FastAPI's routing, are documented all the same.
    assert "post" in on[2].json()["paths"]["/v1/chat/completions"]


# 5. A key's model list as enforced ----------------------------------------------------------


async def test_an_empty_model_list_is_refused_and_listed_as_enforced(tmp_path: Path) -> None:
    async with asgi_hub(offline_config(tmp_path)) as (http, services):
        created = await http.post(
            "/admin/keys", json={"name": "none", "allowed_models": []}, headers=ADMIN
        )
        # A key stored with [] before this check (or by other means) lists as what it is.
        record, key = await services.keys.create(name="old", now=0.0, allowed_models=[])
        shown = await http.get(f"/admin/keys/{record.id}", headers=ADMIN)
        listed = await http.get("/admin/keys", headers=ADMIN)
        models = await http.get("/v1/models", headers={"authorization": f"Bearer {key.secret}"})
    assert created.status_code == 400
    assert "allowed_models" in created.json()["error"]["message"]
    assert shown.json()["allowed_models"] == []
    assert [k["allowed_models"] for k in listed.json()] == [[]]
    assert models.json()["data"] == []  # it is enforced as []: no model


def test_the_cli_lists_an_empty_model_list_as_none(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from hub.cli import hub
    from hub.key_store import KeyStore
    from hub.storage import open_engine

    config_path = tmp_path / "hub.yaml"
    config_path.write_text("data_dir: data\n")
    assert CliRunner().invoke(hub, ["db", "upgrade", "-c", str(config_path)]).exit_code == 0

    async def create() -> str:
        engine = open_engine(parse_config({"data_dir": str(tmp_path / "data")}).database)
        try:
            record, _key = await KeyStore(engine).create(name="old", now=0.0, allowed_models=[])
        finally:
            await engine.dispose()
        return record.id

    key_id = asyncio.run(create())
    listed = CliRunner().invoke(hub, ["keys", "list", "-c", str(config_path)]).stdout
    assert key_id in listed and "(none)" in listed and "*" not in listed


# 6. The group header only with a proxy-identified user ------------------------------------


def test_a_group_header_needs_the_user_header() -> None:
    with pytest.raises(ConfigError, match="proxy_group_header needs proxy_user_header"):
        parse_config({"auth": {"proxy_group_header": "X-Forwarded-Groups"}})


def test_the_documented_proxy_sets_every_identity_header() -> None:
    """A trusted proxy passes on what the client sent unless it sets the header itself: the
    deployment guide's nginx must set (or clear) both the user and the group header."""
    guide = (DOCS / "deployment.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```nginx\n(.*?)```", guide, re.S)
    sso = [block for block in blocks if "auth_request" in block]
    assert sso, "the single sign-on section has an nginx example"
    for header in (SSO["proxy_user_header"], SSO["proxy_group_header"]):
        assert re.search(rf"proxy_set_header\s+{header}\s", sso[0]), header


async def test_an_overlong_sso_name_is_refused_not_a_database_error(
    tmp_path: Path, standin_server: str, database_url: str
) -> None:
    """PostgreSQL enforces the columns' width (it answered 500 database_error): a user or
    group of 201 characters from the proxy is a clear 400 before anything is counted."""
    config = hub_config(tmp_path, standin_server, STANDIN_MODEL, database_url, auth=SSO)
    page = {"content-type": "application/json", "sec-fetch-site": "same-origin"}
    async with running_hub(config) as hub, hub.client() as http:
        answers = [
            await http.post("/v1/completions", content=completion(), headers=page | identity)
            for identity in (
                {"x-forwarded-user": "u" * 201},
                {"x-forwarded-user": "user", "x-forwarded-groups": "g" * 201},
                {"x-forwarded-user": "u" * 200, "x-forwarded-groups": "g" * 200},
            )
        ]
    assert_refused(answers[0], 400, "invalid_identity")
    assert_refused(answers[1], 400, "invalid_identity")
    assert answers[2].status_code == 200, answers[2].text
