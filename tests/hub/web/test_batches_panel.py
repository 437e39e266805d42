"""The account page's Batches panel in a real browser (Chromium, Playwright).

The real chain on this machine: the mock OpenID provider, the hub (`saia hub serve`) whose
`hpc` upstream reaches the real agent (`saia hpc agent`, local executor: a batch runs as the
batch job script with the stand-in server) on its Unix socket. All are subprocesses stopped
by pid. A person logs in, makes a key on the page, runs batches with the openai SDK and
follows them on the page: progress, completion, the output downloaded through the link with
the session, a cancel; nobody sees another person's batches, not even an admin. Set
SAIA_PAGES_SCREENSHOTS=DIR to keep a picture of the panel (docs/screenshot-batches.png).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import openai
import pytest
from playwright.async_api import Browser, Page

from saia.sandbox.process import free_port, stop_process
from tests.hub.web.test_chat_page import CHROMIUM, browser
from tests.hub.web.test_login_pages import (
    ADMIN_TOKEN,
    SESSION_SECRET,
    Site,
    insert_session,
    log_in,
    new_page,
    register,
    spawn,
    start_provider,
    wait_for,
)

pytestmark = pytest.mark.e2e
__all__ = ["browser"]  # the fixture, shared with the chat page's tests

FAST, SLOW = "bulk", "slow-bulk"
BATCH_LIMIT_MS = 180_000  # a local batch job starting the stand-in on a loaded machine


def agent_config(directory: Path) -> Path:
    standin = {"template": "standin", "min_instances": 0}
    config = {
        "state_dir": str(directory / "agent"), "executor": "local",
        "services": [
            {"name": FAST, "model": FAST, **standin},
            # One answer at a time, paced: 200 requests take minutes, time to cancel.
            {"name": SLOW, "model": SLOW, **standin,
             "server_args": ["--token-delay", "0.05", "--max-running", "1"]},
        ],
    }  # fmt: skip
    path = directory / "agent.yaml"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def hub_config(directory: Path, port: int, provider: str, client_id: str) -> Path:
    site = {"socket": str(directory / "agent" / "agent.sock")}
    config = {
        "host": "127.0.0.1", "port": port, "data_dir": str(directory / "data"),
        "usage_flush_interval": 0.2,
        "upstreams": {"cluster": {"kind": "hpc", "sites": [site]}},
        "models": [{"id": FAST, "upstream": "cluster"}, {"id": SLOW, "upstream": "cluster"}],
        "batches": {"poll_interval": 0.5},
        "oidc": {
            "issuer": provider, "client_id": client_id, "client_secret_env": "OIDC_CLIENT_SECRET",
            "group_claim": "groups", "admin_group": "saia-admins",
        },
        "self_service": {"keys_per_user": 2},
    }  # fmt: skip
    path = directory / "hub.yaml"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    if not CHROMIUM.exists():
        pytest.fail("chromium is missing: run `python -m saia.sandbox.packages`", pytrace=False)
    directory = tmp_path_factory.mktemp("batches-panel")
    saia = [sys.executable, "-c", "from saia.cli import main; main()"]
    with contextlib.ExitStack() as stack:
        provider, provider_proc = start_provider(directory)
        stack.callback(stop_process, provider_proc, 10.0)
        agent = spawn([*saia, "hpc", "agent", "-c", str(agent_config(directory))],
                      directory / "agent.log")  # fmt: skip
        stack.callback(stop_process, agent, 20.0)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        client_id, client_secret = register(provider, f"{url}/auth/callback")
        env = {
            "SAIA_HUB_SESSION_SECRET": SESSION_SECRET,
            "OIDC_CLIENT_SECRET": client_secret,
            "SAIA_HUB_ADMIN_TOKEN": ADMIN_TOKEN,
        }
        config = hub_config(directory, port, provider, client_id)
        hub = spawn([*saia, "hub", "serve", "-c", str(config)], directory / "hub.log", env)
        stack.callback(stop_process, hub, 10.0)
        wait_for(f"{url}/health", hub, directory / "hub.log")
        yield Site(url, provider, directory / "data" / "hub.db")


def requests_file(model: str, count: int, words: int = 3, max_tokens: int = 4) -> bytes:
    lines = []
    for i in range(count):
        text = " ".join(f"w{i}-{j}" for j in range(words))
        body = {"model": model, "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": text}]}  # fmt: skip
        lines.append({"custom_id": f"row-{i}", "method": "POST",
                      "url": "/v1/chat/completions", "body": body})  # fmt: skip
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


async def start_batch(api: openai.AsyncOpenAI, content: bytes) -> Any:
    uploaded = await api.files.create(file=("in.jsonl", io.BytesIO(content)), purpose="batch")
    return await api.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )


async def set_hidden(page: Page, hidden: bool) -> None:
    """The tab hidden or shown, as the page sees it (headless Chromium is never hidden)."""
    await page.evaluate(
        "(hidden) => { Object.defineProperty(document, 'hidden', {value: hidden,"
        " configurable: true}); document.dispatchEvent(new Event('visibilitychange')); }",
        hidden,
    )


async def no_refresh_while_hidden(page: Page) -> None:
    """With a batch running the panel asks every 3 s, but not while the tab is hidden."""
    asked: list[str] = []
    page.on("request", lambda r: asked.append(r.url) if "/v1/batches?" in r.url else None)
    await set_hidden(page, True)
    before = len(asked)
    await page.wait_for_timeout(7000)  # two refresh periods and more: none may come
    assert len(asked) == before, asked
    async with page.expect_request(lambda r: "/v1/batches?" in r.url):
        await set_hidden(page, False)  # shown again: at once


async def key_from_page(page: Page) -> str:
    await page.fill("#key-name", "batches")
    await page.click("#create-key")
    await page.locator("#new-secret").wait_for(state="visible")
    return (await page.text_content("#secret") or "").strip()


def row(page: Page, batch_id: str, status: str | None = None) -> Any:
    which = f"tr[data-batch='{batch_id}']"
    return page.locator(f"{which}[data-status='{status}']" if status else which)


@pytest.fixture
def bobs_batch(site: Site) -> str:
    """Another person's batch, made with a key bob made with his session."""
    cookie = {"cookie": "saia_session=" + insert_session(site.database, "bob", time.time() + 600)}
    made = httpx.post(f"{site.url}/me/keys", json={"name": "b"}, headers=cookie, trust_env=False)
    assert made.status_code == 201, made.text
    api = openai.OpenAI(base_url=f"{site.url}/v1", api_key=made.json()["secret"], max_retries=0)
    uploaded = api.files.create(
        file=("bob.jsonl", io.BytesIO(requests_file(FAST, 2))), purpose="batch"
    )
    batch = api.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    return batch.id


async def download_output(page: Page, api: openai.AsyncOpenAI, fast: Any) -> None:
    """The page follows the batch by itself until it is done; its link downloads the output."""
    await row(page, fast.id, "completed").wait_for(timeout=BATCH_LIMIT_MS)
    assert await row(page, fast.id).locator(".count").text_content() == "12 of 12"
    assert await row(page, fast.id).locator("progress").get_attribute("value") == "12"
    done = await api.batches.retrieve(fast.id)
    assert done.output_file_id
    async with page.expect_download() as downloading:
        await row(page, fast.id).locator("a[data-file=output]").click()
    download = await downloading.value
    assert download.suggested_filename == f"{fast.id}-output.jsonl"
    saved = await anyio.Path(await download.path()).read_bytes()
    assert saved == (await api.files.content(done.output_file_id)).content
    assert len(saved.splitlines()) == 12


async def cancel_on_page(page: Page, api: openai.AsyncOpenAI, slow: Any) -> None:
    """Cancel with the keyboard: the first press asks, the second cancels."""
    button = row(page, slow.id).locator("button[data-cancel]")
    await button.focus()
    await page.keyboard.press("Enter")
    await page.locator(f"button[data-cancel='{slow.id}']", has_text="Confirm cancel").wait_for()
    await page.keyboard.press("Enter")
    stopping = "[data-status=cancelling], [data-status=cancelled]"
    await page.locator(f"tr[data-batch='{slow.id}']:is({stopping})").wait_for()
    await row(page, slow.id, "cancelled").wait_for(timeout=BATCH_LIMIT_MS)
    assert (await api.batches.retrieve(slow.id)).status == "cancelled"
    assert await row(page, slow.id).locator("button").count() == 0


async def test_follow_download_and_cancel_batches(
    browser: Browser, site: Site, bobs_batch: str
) -> None:
    context, page, problems = await new_page(browser)
    await log_in(page, site, "alice")
    await page.locator("#batches-empty").wait_for(state="visible")  # none yet: how to start
    assert f"{site.url}/v1" in (await page.text_content("#batches-empty") or "")
    api = openai.AsyncOpenAI(base_url=f"{site.url}/v1", api_key=await key_from_page(page),
                             max_retries=0, timeout=60)  # fmt: skip
    fast = await start_batch(api, requests_file(FAST, 12))
    slow = await start_batch(api, requests_file(SLOW, 200, words=12, max_tokens=12))
    try:
        await page.reload()
        await page.locator("body[data-loaded=true]").wait_for(state="attached")
        ids = await page.eval_on_selector_all(
            "tr[data-batch]", "rows => rows.map(r => r.dataset.batch)"
        )
        assert ids == [slow.id, fast.id]  # newest first; bob's is not there
        assert await row(page, fast.id).locator("td").first.text_content() == FAST
        text = await row(page, slow.id).locator("td.progress .count").text_content() or ""
        assert re.fullmatch(r"[\d,]+ of 200", text), text
        await download_output(page, api, fast)
        await row(page, slow.id, "in_progress").wait_for(timeout=BATCH_LIMIT_MS)
        await no_refresh_while_hidden(page)
        await cancel_on_page(page, api, slow)
    finally:  # a failed test leaves no batch job running on this machine
        with contextlib.suppress(openai.APIError):
            await api.batches.cancel(slow.id)

    shots = os.environ.get("SAIA_PAGES_SCREENSHOTS")  # docs/screenshot-batches.png
    if shots:
        panel = page.locator("#batches-panel")
        await panel.screenshot(path=str(Path(shots) / "screenshot-batches.png"))
    # The session lists alice's batches only, as her key does.
    listed = await page.evaluate("async () => (await fetch('../v1/batches')).json()")
    assert [b["id"] for b in listed["data"]] == [slow.id, fast.id] and bobs_batch not in str(listed)
    # At a phone's width the page does not scroll sideways (the table scrolls in its box).
    await page.set_viewport_size({"width": 375, "height": 800})
    widths = await page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
    assert widths[0] <= widths[1], widths
    await context.close()
    assert not problems, problems

    # An admin's page shows her own batches (none), not everybody's.
    context, page, problems = await new_page(browser)
    await log_in(page, site, "olga")
    await page.locator("#batches-empty").wait_for(state="visible")
    assert await page.locator("tr[data-batch]").count() == 0
    await context.close()
    assert not problems, problems


HOSTILE_ID = "batch-<img src=x id=pwn>"
HOSTILE_MODEL = "<b id=bold>m</b>"
HOSTILE_MESSAGE = '<img src=x id=pwn2> & "quoted"'


@pytest.fixture
def carols_session(site: Site) -> str:
    """carol's session and 13 ended batches of hers written into the database: 12 plain
    ones, and the newest with markup in its id, model and error message (a user's text)."""
    now = time.time()
    rows = []
    for i in range(13):
        hostile = i == 12
        errors = [{"code": "x", "message": HOSTILE_MESSAGE, "line": None}] if hostile else None
        rows.append((
            HOSTILE_ID if hostile else f"batch-carol-{i:02d}", "user:carol", "carol",
            "/v1/chat/completions", HOSTILE_MODEL if hostile else FAST, "cluster", 0,
            "file-none", "24h", "failed", now - 100 + i, now - 50 + i, 4, 1, 3,
            json.dumps(errors),
        ))  # fmt: skip
    with contextlib.closing(sqlite3.connect(site.database, timeout=10)) as db, db:
        db.executemany(
            "INSERT INTO batches (id, owner, user_name, endpoint, model, upstream, site,"
            " input_file_id, completion_window, status, created_at, failed_at, total,"
            " completed, failed, prompt_tokens, completion_tokens, price_factor, errors)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, 0, 1.0, ?)",
            rows,
        )
    return insert_session(site.database, "carol", now + 600)


async def test_pages_and_text_only(browser: Browser, site: Site, carols_session: str) -> None:
    context, page, problems = await new_page(browser)
    await context.add_cookies([{"name": "saia_session", "value": carols_session, "url": site.url}])
    await page.goto(f"{site.url}/account/")
    await page.locator("body[data-loaded=true]").wait_for(state="attached")
    shown = "rows => rows.map(r => r.dataset.batch)"
    first = await page.eval_on_selector_all("tr[data-batch]", shown)
    assert first == [HOSTILE_ID] + [f"batch-carol-{i:02d}" for i in range(11, 2, -1)]
    # Markup from the API is text on the page, never elements.
    hostile = page.locator("tr[data-batch]").first
    assert await hostile.locator("th").text_content() == HOSTILE_ID
    assert await hostile.locator("td").first.text_content() == HOSTILE_MODEL
    assert await hostile.locator(".why").text_content() == HOSTILE_MESSAGE
    assert await page.locator("#batches img, #batches b").count() == 0
    assert await hostile.locator(".count").text_content() == "4 of 4, 3 failed"
    assert await hostile.locator("button").count() == 0  # an ended batch: no Cancel
    # Paged with `after`, as the API: older, then back to the newest.
    assert await page.is_hidden("#batches-newer")
    await page.click("#batches-older")
    await page.locator("tr[data-batch='batch-carol-00']").wait_for()
    older = await page.eval_on_selector_all("tr[data-batch]", shown)
    assert older == [f"batch-carol-{i:02d}" for i in (2, 1, 0)]
    assert await page.is_hidden("#batches-older")
    await page.click("#batches-newer")
    await page.locator("tr[data-batch='batch-carol-11']").wait_for()
    assert await page.eval_on_selector_all("tr[data-batch]", shown) == first
    await context.close()
    assert not problems, problems
    # What the panel does with the session, a page of another site cannot.
    cookie = {"cookie": f"saia_session={carols_session}"}
    async with httpx.AsyncClient(base_url=site.url, headers=cookie, trust_env=False) as http:
        form = await http.post(
            "/v1/batches/batch-carol-00/cancel", content=b"x=1",
            headers={"content-type": "application/x-www-form-urlencoded"},
        )  # fmt: skip
        foreign = await http.get(
            "/v1/files/file-none/content",
            headers={"origin": "https://evil.example", "sec-fetch-site": "cross-site"},
        )
        ended = await http.post("/v1/batches/batch-carol-00/cancel", json={})
    for answer in (form, foreign):
        assert answer.status_code == 403, answer.text
        assert answer.json()["error"]["code"] == "cross_site_request"
    assert ended.status_code == 409  # the same request as the page's, on an ended batch
