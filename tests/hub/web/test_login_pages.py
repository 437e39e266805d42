"""OpenID Connect login, the self-service page and the operator dashboard in a real browser.

A real OpenID provider (oidc-provider-mock, `python -m oidc_provider_mock`) runs on a free
127.0.0.1 port with registration required; the hub (`saia hub serve`, a subprocess) is
registered there as a confidential client; the stand-in model server answers the chats.
All are stopped by pid. Set SAIA_PAGES_SCREENSHOTS=DIR to keep the screenshots of both pages
(docs/screenshot-account.png and docs/screenshot-dashboard.png are made that way).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import openai
import pytest
from playwright.async_api import Browser, BrowserContext, Page

from saia.sandbox.process import free_port, stop_process
from tests.fixtures.standin import start_standin
from tests.hub.web.test_chat_page import CHROMIUM, UI_TIMEOUT_MS, browser, saia

pytestmark = pytest.mark.e2e
__all__ = ["browser"]  # the fixture, shared with the chat page's tests

MODEL = "standin-model"
START_TIMEOUT = 30.0
SESSION_SECRET = "login-cookie-signing-secret-for-tests-0123456789"
ADMIN_TOKEN = "admin-token-for-tests-0123456789"
USERS = [
    {"sub": "alice", "groups": ["physics"]},
    {"sub": "olga", "groups": ["physics", "saia-admins"]},
]


@dataclass
class Site:
    url: str
    provider: str
    database: Path


def wait_for(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}: {log.read_text()}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=1.0, trust_env=False).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {START_TIMEOUT}s")


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("wb") as output:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=output, stderr=output, cwd=log.parent,
            env={**os.environ, **(env or {})},
        )  # fmt: skip


def start_provider(directory: Path) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    argv = [sys.executable, "-m", "oidc_provider_mock", "-p", str(port), "-r", "true"]
    for user in USERS:
        argv += ["--user-claims", json.dumps(user)]
    log = directory / "provider.log"
    proc = spawn(argv, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/.well-known/openid-configuration", proc, log)
    except BaseException:
        stop_process(proc, 10.0)
        raise
    return url, proc


def register(provider: str, redirect: str) -> tuple[str, str]:
    """The hub registered at the provider: its client id and secret."""
    answer = httpx.post(
        f"{provider}/oauth2/clients", json={"redirect_uris": [redirect]}, trust_env=False
    )
    assert answer.status_code == 201, answer.text
    return answer.json()["client_id"], answer.json()["client_secret"]


def hub_config(directory: Path, port: int, standin: str, provider: str, client_id: str) -> Path:
    config = {
        "host": "127.0.0.1",
        "port": port,
        "data_dir": str(directory / "data"),
        "usage_flush_interval": 0.2,
        "upstreams": {"standin": {"kind": "openai", "base_url": f"{standin}/v1"}},
        "models": [
            {"id": MODEL, "upstream": "standin"},
            {"id": "standin-large", "upstream": "standin", "upstream_model": MODEL},
        ],
        "auth": {
            "user_limits": {"tokens_per_day": 20000, "tokens_per_month": 400000},
            "default_key_limits": {"requests_per_minute": 60, "requests_per_day": 1000},
        },
        "oidc": {
            "issuer": provider,
            "client_id": client_id,
            "client_secret_env": "OIDC_CLIENT_SECRET",
            "group_claim": "groups",
            "admin_group": "saia-admins",
        },
        "self_service": {"keys_per_user": 2, "key_limits": {"requests_per_minute": 30}},
    }
    path = directory / "hub.yaml"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    if not CHROMIUM.exists():
        pytest.fail("chromium is missing: run `python -m saia.sandbox.packages`", pytrace=False)
    directory = tmp_path_factory.mktemp("login")
    with contextlib.ExitStack() as stack:
        standin = start_standin(MODEL, token_delay=0.0)
        stack.callback(standin.stop)
        provider, provider_proc = start_provider(directory)
        stack.callback(stop_process, provider_proc, 10.0)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        client_id, client_secret = register(provider, f"{url}/auth/callback")
        config = hub_config(directory, port, standin.url, provider, client_id)
        env = {
            "SAIA_HUB_SESSION_SECRET": SESSION_SECRET,
            "OIDC_CLIENT_SECRET": client_secret,
            "SAIA_HUB_ADMIN_TOKEN": ADMIN_TOKEN,
        }
        argv = [sys.executable, "-c", "from saia.cli import main; main()", "hub", "serve"]
        proc = spawn([*argv, "-c", str(config)], directory / "hub.log", env)
        stack.callback(stop_process, proc, 10.0)
        wait_for(f"{url}/health", proc, directory / "hub.log")
        yield Site(url, provider, directory / "data" / "hub.db")


async def new_page(browser: Browser) -> tuple[BrowserContext, Page, list[str]]:
    context = await browser.new_context(viewport={"width": 1200, "height": 900})
    page = await context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on(
        "console",
        lambda message: (
            problems.append(message.text) if "Content Security Policy" in message.text else None
        ),
    )
    return context, page, problems


async def log_in(page: Page, site: Site, user: str, start: str = "/account/") -> None:
    """Through the provider's own form, as a person would: the page's Log in, then the user."""
    await page.goto(f"{site.url}{start}")
    await page.locator("#login").wait_for(state="visible")
    await page.click("#login a")
    await page.wait_for_url(f"{site.provider}/**")
    # The authorization request: code flow with a PKCE challenge (S256), a state and a nonce.
    for part in ("response_type=code", "code_challenge=", "code_challenge_method=S256", "nonce="):
        assert part in page.url, (part, page.url)
    await page.click(f"button[name=sub][value={user}]")
    await page.wait_for_url(f"{site.url}{start}")
    await page.locator("body[data-loaded=true]").wait_for(state="attached")


async def wait_for_usage(page: Page, limit_s: float = 10.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        usage = await page.evaluate("async () => (await fetch('../me/usage')).json()")
        if usage["today"]["requests"]:
            return
        await page.wait_for_timeout(100)
    raise AssertionError(f"no usage row within {limit_s}s")


async def session_of(context: BrowserContext) -> str:
    cookies = {c["name"]: c for c in await context.cookies()}
    cookie = cookies["saia_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    return str(cookie["value"])


async def test_login_create_key_chat_and_logout(browser: Browser, site: Site) -> None:
    context, page, problems = await new_page(browser)
    await log_in(page, site, "alice")
    assert await page.text_content("#who") == "alice (physics)"
    assert await page.is_hidden("#dashboard-link")  # not in the admin group
    cookie = await session_of(context)

    await page.fill("#key-name", "laptop")
    await page.click("#create-key")
    await page.locator("#new-secret").wait_for(state="visible")
    secret = (await page.text_content("#secret") or "").strip()
    assert secret.startswith("sk-saia-")
    await page.locator("tr[data-key-row] td.state-active").wait_for()

    client = openai.AsyncOpenAI(base_url=f"{site.url}/v1", api_key=secret, max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hello from alice"}]
    )
    answer = raw.parse()
    assert answer.choices[0].message.content
    # The self-made key's per-minute limit is announced from the first request.
    assert raw.headers["x-ratelimit-limit-minute"] == "30"

    await wait_for_usage(page)  # the hub writes usage rows every 0.2 s
    await page.reload()
    await page.locator("body[data-loaded=true]").wait_for(state="attached")
    assert await page.text_content("#cards .figure") == "1"  # requests today
    assert await page.locator("#chart-daily canvas").count() == 1

    # The chat page needs no key with a session: it is signed in like the proxy's SSO mode.
    await page.goto(f"{site.url}/chat/")
    await page.wait_for_function(
        "() => document.querySelector('#identity')?.textContent"
        " === 'Signed in through your organisation'"
    )
    await page.goto(f"{site.url}/account/")
    await page.locator("body[data-loaded=true]").wait_for(state="attached")
    await page.click("#logout")
    # RP-initiated logout: the provider ends its login too, then sends the browser back.
    await page.wait_for_url("**/oauth2/end_session?*")
    assert "post_logout_redirect_uri=" + quote(f"{site.url}/account/", safe="") in page.url
    await page.click("button[type=submit]")  # the provider's (mock's) confirmation
    await page.wait_for_url(f"{site.url}/account/**")
    await page.locator("#login").wait_for(state="visible")
    assert "saia_session" not in {c["name"] for c in await context.cookies()}
    # The cookie from before the logout is dead on the server, not only in the browser.
    async with httpx.AsyncClient(trust_env=False) as http:
        gone = await http.get(f"{site.url}/me", headers={"cookie": f"saia_session={cookie}"})
    assert gone.status_code == 401 and gone.json()["error"]["code"] == "invalid_session"
    # The key outlives the session: it is revoked on the page, not by logging out.
    assert (await client.models.list()).data
    await context.close()
    assert not problems, problems


def insert_session(database: Path, user: str, expires_at: float, admin: bool = False) -> str:
    """A session row as the hub writes it (the digest of a random cookie); its cookie."""
    token = secrets.token_urlsafe(32)
    digest = hashlib.sha256(token.encode()).hexdigest()
    with contextlib.closing(sqlite3.connect(database, timeout=10)) as db, db:
        db.execute(
            "INSERT INTO web_sessions VALUES (?, ?, ?, ?, ?, ?)",
            (digest, user, None, admin, time.time() - 10, expires_at),
        )
    return token


def test_forged_expired_and_cross_site_sessions_refused(site: Site) -> None:
    def me(cookie: str, **headers: str) -> httpx.Response:
        return httpx.get(
            f"{site.url}/me", cookies={"saia_session": cookie}, headers=headers, trust_env=False
        )

    forged = me(secrets.token_urlsafe(32))
    assert forged.status_code == 401 and forged.json()["error"]["code"] == "invalid_session"
    expired = me(insert_session(site.database, "mallory", time.time() - 1))
    assert expired.status_code == 401 and expired.json()["error"]["code"] == "invalid_session"
    live = insert_session(site.database, "bob", time.time() + 600)
    assert me(live).json()["user"] == "bob"
    chat = httpx.post(
        f"{site.url}/v1/chat/completions", cookies={"saia_session": live}, trust_env=False,
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
    )  # fmt: skip
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"]
    # The same CSRF rules as the proxy's header mode: a page elsewhere, or a non-JSON body.
    foreign = me(live, origin="https://evil.example", **{"sec-fetch-site": "cross-site"})
    assert foreign.status_code == 403 and foreign.json()["error"]["code"] == "cross_site_request"
    form = httpx.post(
        f"{site.url}/me/keys", cookies={"saia_session": live}, content=b"name=x",
        headers={"content-type": "application/x-www-form-urlencoded"}, trust_env=False,
    )  # fmt: skip
    assert form.status_code == 403 and form.json()["error"]["code"] == "cross_site_request"
    # A non-admin session reads no admin API; a callback with a made-up state is refused.
    admin = httpx.get(f"{site.url}/admin/keys", cookies={"saia_session": live}, trust_env=False)
    assert admin.status_code == 403 and admin.json()["error"]["code"] == "not_admin"
    callback = httpx.get(f"{site.url}/auth/callback?code=x&state=y", trust_env=False)
    assert callback.status_code == 400 and "mismatching_state" in callback.text


def test_key_quota_and_owner_scoped_revocation(site: Site) -> None:
    # The session cookie as a header: httpx deprecates per-request cookies on a client.
    bob = {"cookie": "saia_session=" + insert_session(site.database, "bob", time.time() + 600)}
    eve = {"cookie": "saia_session=" + insert_session(site.database, "eve", time.time() + 600)}
    with httpx.Client(base_url=site.url, trust_env=False) as http:
        made = [http.post("/me/keys", json={"name": f"k{i}"}, headers=bob) for i in range(3)]
        assert [r.status_code for r in made] == [201, 201, 403]
        assert made[2].json()["error"]["code"] == "too_many_keys"
        key_id = made[0].json()["key"]["id"]
        assert http.delete(f"/me/keys/{key_id}", headers=eve).status_code == 404
        assert [k["id"] for k in http.get("/me/keys", headers=eve).json()] == []
        assert http.delete(f"/me/keys/{key_id}", headers=bob).json()["revoked"] is True
        assert http.post("/me/keys", json={"name": "k3"}, headers=bob).status_code == 201
        # An API key manages no keys.
        secret = made[1].json()["secret"]
        by_key = http.get("/me/keys", headers={"authorization": f"Bearer {secret}"})
        assert by_key.status_code == 403


def seed_history(database: Path) -> int:
    """Usage rows of the past 30 days (the screenshot's history; today's rows are real)."""
    now = time.time()
    rows = []
    people = [("alice", "physics"), ("bob", "chemistry"), ("carol", "chemistry"), ("dan", None)]
    for hour in range(1, 30 * 24, 5):
        for index, (user, group) in enumerate(people):
            if (hour + index) % 3 == 0:
                continue
            tokens = 200 + (hour * 37 + index * 101) % 900
            model = MODEL if index % 2 == 0 else "standin-large"
            started = now - hour * 3600 - index * 60
            rows.append((
                f"seed-{hour}-{index}", None, user, group, model, "standin",
                "chat/completions", 200, True, tokens // 3, tokens - tokens // 3,
                800.0, 120.0, started, started + 0.8,
            ))  # fmt: skip
    with contextlib.closing(sqlite3.connect(database, timeout=10)) as db, db:
        db.executemany(
            "INSERT INTO usage (request_id, key_id, user_name, group_name, model, upstream,"
            " endpoint, status, stream, prompt_tokens, completion_tokens, latency_ms, ttft_ms,"
            " started_at, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
    return len(rows)


async def real_traffic(site: Site) -> None:
    """Chats through the hub with keys of three users in two groups, on both models."""
    for owner, group in (("alice", "physics"), ("bob", "chemistry"), ("carol", "chemistry")):
        created = saia(
            "hub", "keys", "create", "-c", str(site.database.parent.parent / "hub.yaml"),
            "--name", owner, "--user", owner, "--group", group, cwd=site.database.parent.parent,
        )  # fmt: skip
        client = openai.AsyncOpenAI(base_url=f"{site.url}/v1", api_key=created, max_retries=0)
        for model in (MODEL, "standin-large"):
            answer = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": f"hi from {owner}"}]
            )
            assert answer.usage is not None and answer.usage.total_tokens > 0


async def test_dashboard_for_admins_and_screenshots(browser: Browser, site: Site) -> None:
    seeded = seed_history(site.database)
    await real_traffic(site)
    context, page, problems = await new_page(browser)
    await log_in(page, site, "olga", start="/dashboard/")
    assert await page.text_content("#who") == "olga"
    row = page.locator(f"tr[data-service='{MODEL}']")
    assert "ready" in (await row.text_content() or "")
    await page.select_option("#range", "month")
    await page.wait_for_function("() => document.querySelectorAll('.chart canvas').length === 4")
    legend = await page.locator("#chart-user .u-legend").text_content() or ""
    assert all(user in legend for user in ("alice", "bob", "carol"))
    # The admin API answers the admin's session; the figures include today's real chats.
    since = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 40 * 86400))
    series = await page.evaluate(
        "async (since) => (await fetch(`../admin/usage/series?since=${since}&by=user&bucket=day`))"
        ".json()",
        since,
    )
    assert sum(r["requests"] for r in series) >= seeded + 6
    shots = os.environ.get("SAIA_PAGES_SCREENSHOTS")
    if shots:
        await page.screenshot(path=str(Path(shots) / "screenshot-dashboard.png"), full_page=True)
    await context.close()
    assert not problems, problems
    # alice's own page: her seeded history and today's real chats against her limits.
    context, page, problems = await new_page(browser)
    await log_in(page, site, "alice")
    assert await page.locator(".chart canvas").count() == 2
    if shots:
        await page.screenshot(path=str(Path(shots) / "screenshot-account.png"), full_page=True)
    await context.close()
    assert not problems, problems
