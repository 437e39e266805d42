"""The chat page in a real browser, against the real hub and the stand-in model server.

Debian's chromium is driven by Playwright (never `playwright install`). The hub runs as
`saia hub serve` on a free 127.0.0.1 port with an `openai` upstream pointing at the
stand-in server (`python -m hpc.standin`); both are subprocesses stopped by pid. Set
SAIA_CHAT_SCREENSHOT=PATH to keep the screenshot of an answered chat (docs/screenshot-chat.png
shows a real model instead: docs/screenshot_chat.py against `saia demo --vllm`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, Page, async_playwright

from saia.sandbox.process import free_port, stop_process
from tests.fixtures.standin import StandinProcess, start_standin

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MODEL = "standin-model"
MODEL_NAME = "Stand-in model"
DOWN_MODEL = "unreachable-model"
FRAGILE_MODEL = "fragile-model"  # its stand-in is killed in the middle of an answer
TOKEN_DELAY = 0.1  # seconds per streamed word: slow enough to watch the answer grow
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
UI_TIMEOUT_MS = 15_000
SSO_HEADER = "X-Forwarded-User"


@dataclass
class HubProcess:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    standin: StandinProcess
    fragile: StandinProcess
    key: str  # any model, no limits
    limited_key: str  # two requests per day (a minute window could roll over mid-test)

    def stop(self) -> None:
        stop_process(self.proc, STOP_TIMEOUT)


def saia(*args: str, cwd: Path) -> str:
    """Run the `saia` CLI of this checkout; its stdout."""
    argv = [sys.executable, "-c", "from saia.cli import main; main()", *args]
    done = subprocess.run(argv, cwd=cwd, capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout.decode().strip()


def write_hub_config(directory: Path, port: int, standin_url: str, fragile_url: str) -> Path:
    config = {
        "host": "127.0.0.1",
        "port": port,
        "data_dir": str(directory / "data"),
        "upstreams": {
            "standin": {"kind": "openai", "base_url": f"{standin_url}/v1"},
            "fragile": {"kind": "openai", "base_url": f"{fragile_url}/v1"},
            # A closed port on loopback: the hub cannot reach it.
            "down": {"kind": "openai", "base_url": f"http://127.0.0.1:{free_port()}/v1"},
        },
        "models": [
            {"id": MODEL, "name": MODEL_NAME, "upstream": "standin"},
            {"id": DOWN_MODEL, "upstream": "down"},
            {"id": FRAGILE_MODEL, "upstream": "fragile", "upstream_model": MODEL},
        ],
        # The browser context of the single-sign-on test plays the proxy and sends the header.
        "auth": {"proxy_user_header": SSO_HEADER, "trusted_proxies": ["127.0.0.1/32"]},
    }
    path = directory / "hub.yaml"
    path.write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
    return path


def wait_healthy(hub: HubProcess) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if hub.proc.poll() is not None:
            raise RuntimeError(f"hub exited with {hub.proc.returncode}: {hub.log.read_text()}")
        try:
            if httpx.get(f"{hub.url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"hub did not answer /health within {START_TIMEOUT}s")


def start_hub(directory: Path, config: str) -> subprocess.Popen[bytes]:
    log = directory / "hub.log"
    with log.open("wb") as output:
        return subprocess.Popen(
            [sys.executable, "-c", "from saia.cli import main; main()", "hub", "serve",
             "-c", config],
            cwd=directory, stdin=subprocess.DEVNULL, stdout=output, stderr=output,
        )  # fmt: skip


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    if not CHROMIUM.exists():
        pytest.fail("chromium is missing: run `python -m saia.sandbox.packages`", pytrace=False)
    directory = tmp_path_factory.mktemp("hub")
    with contextlib.ExitStack() as stack:
        standin = start_standin(MODEL, token_delay=TOKEN_DELAY)
        stack.callback(standin.stop)
        fragile = start_standin(MODEL, token_delay=TOKEN_DELAY)
        stack.callback(fragile.stop)
        port = free_port()
        config = str(write_hub_config(directory, port, standin.url, fragile.url))
        key = saia("hub", "keys", "create", "-c", config, "--name", "chat", cwd=directory)
        limited = saia(
            "hub", "keys", "create", "-c", config, "--name", "limited",
            "--requests-per-day", "2", cwd=directory,
        )  # fmt: skip
        proc = start_hub(directory, config)
        server = HubProcess(
            f"http://127.0.0.1:{port}", proc, directory / "hub.log", standin, fragile, key, limited
        )
        stack.callback(server.stop)
        wait_healthy(server)
        yield server


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield browser
        finally:
            await browser.close()


async def open_page(browser: Browser, hub: HubProcess, **options: Any) -> tuple[Page, list[str]]:
    """A fresh context (empty localStorage) on the hub's root, which leads to /chat/.

    Also returns the script errors and dialogs seen on the page (an injected alert() would
    be one); every test ends by asserting there were none.
    """
    context = await browser.new_context(viewport={"width": 1200, "height": 760}, **options)
    page = await context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("dialog", lambda dialog: problems.append(f"unexpected dialog: {dialog.message}"))
    # The page's Content-Security-Policy allows no inline script or style: a violation is a bug.
    page.on(
        "console",
        lambda message: (
            problems.append(message.text) if "Content Security Policy" in message.text else None
        ),
    )
    await page.goto(f"{hub.url}/")
    assert page.url == f"{hub.url}/chat/"
    return page, problems


async def log_in(page: Page, key: str) -> None:
    await page.locator("#login-dialog").wait_for(state="visible")
    await page.fill("#api-key", key)
    await page.click("#login-submit")
    await page.locator("#login-dialog").wait_for(state="hidden")


async def send(page: Page, text: str) -> None:
    await page.fill("#prompt", text)
    await page.press("#prompt", "Enter")


async def last_answer_text(page: Page) -> str:
    text = await page.evaluate(
        "() => document.querySelector('#messages .message.assistant:last-of-type .message-body')"
        "?.textContent ?? ''"
    )
    return str(text)


async def wait_for_answer_text(page: Page, text: str) -> None:
    """Until the answer being written contains `text` (the page's default timeout bounds it)."""
    await page.wait_for_function(
        """(text) => (document.querySelector(
            '#messages .message.assistant:last-of-type .message-body')?.textContent ?? ''
        ).includes(text)""",
        arg=text,
    )


async def watch_answer(page: Page, limit_s: float) -> list[str]:
    """Samples of the answer's text until the page says it is complete (bounded)."""
    samples: list[str] = []
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        samples.append(await last_answer_text(page))
        if await page.locator("#send").is_visible():
            samples.append(await last_answer_text(page))
            return samples
        await page.wait_for_timeout(50)
    raise AssertionError(f"the answer did not complete within {limit_s}s: {samples[-1:]}")


def distinct_partials(samples: list[str]) -> list[str]:
    """The different non-empty texts seen while the answer streamed, in order.

    Not simply growing strings: partial Markdown re-renders (a lone `**` is literal until
    its closing pair arrives).
    """
    return [text for index, text in enumerate(samples) if text and text not in samples[:index]]


async def standin_running(standin: StandinProcess) -> float:
    async with httpx.AsyncClient(timeout=5.0) as client:
        text = (await client.get(f"{standin.url}/metrics")).text
    for line in text.splitlines():
        if line.startswith("vllm:num_requests_running"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no vllm:num_requests_running in the stand-in's metrics: {text!r}")


async def wait_for_idle_backend(standin: StandinProcess, limit_s: float = 10.0) -> float:
    """The stand-in's running requests, once they reach 0 or the limit passes."""
    deadline = time.monotonic() + limit_s
    running = await standin_running(standin)
    while running and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        running = await standin_running(standin)
    return running


async def test_chat_streams_sanitised_markdown(
    browser: Browser, hub: HubProcess, tmp_path: Path
) -> None:
    page, problems = await open_page(browser, hub)
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    await log_in(page, hub.key)
    await page.select_option("#model-select", MODEL)
    option = await page.locator(f"#model-select option[value='{MODEL}']").text_content()
    assert option is not None and MODEL_NAME in option and "ready" in option
    badges = await page.locator("#model-state .badge").all_text_contents()
    assert badges == ["ready", "demand low"]  # an openai upstream is ready, demand 0

    prompt = (
        "Summarise the **request path** hub `ssh` relay agent Slurm job"
        " <img src=x onerror=alert(1)> ![leak](http://127.0.0.1:9/leak.png)"
        " [docs](https://example.org/docs)"
    )
    await send(page, prompt)
    samples = await watch_answer(page, limit_s=30)
    partials = distinct_partials(samples)
    assert len(partials) >= 3, samples  # streamed, not shown at once
    assert len(partials[0]) < len(partials[-1]), partials
    body = page.locator("#messages .message.assistant .message-body").last
    assert await body.locator("strong").text_content() == "request path"
    assert await body.locator("code").text_content() == "ssh"
    link = body.locator("a", has_text="docs")
    assert await link.get_attribute("rel") == "noopener noreferrer nofollow"
    image_link = body.locator("a", has_text="leak")  # an image becomes a link
    assert await image_link.get_attribute("href") == "http://127.0.0.1:9/leak.png"
    assert await page.locator("#messages img").count() == 0  # sanitised: no images at all
    meta = await page.locator("#messages .message.assistant .message-meta").last.text_content()
    assert meta is not None and "prompt" in meta and "answer tokens" in meta  # usage arrived
    assert not [url for url in requested if url.endswith(("/x", "leak.png"))]  # no fetches
    await save_screenshot(page, tmp_path)
    assert "<img src=x onerror=alert(1)>" in await last_answer_text(page)  # shown as text
    assert problems == []  # no script error, no dialog, no CSP report (nothing parsed it)


async def test_stop_ends_the_answer_and_the_backend_request(
    browser: Browser, hub: HubProcess
) -> None:
    page, problems = await open_page(browser, hub)
    await log_in(page, hub.key)
    await page.select_option("#model-select", MODEL)
    long_prompt = " ".join(f"word{index}" for index in range(60))
    await send(page, long_prompt)
    await page.locator("#stop").wait_for(state="visible")
    await wait_for_answer_text(page, "word2")
    await page.click("#stop")
    await page.locator("#send").wait_for(state="visible")
    stopped_text = await last_answer_text(page)
    assert "word59" not in stopped_text
    meta = await page.locator("#messages .message.assistant .message-meta").last.text_content()
    assert meta is not None and "stopped" in meta
    await page.wait_for_timeout(1000)  # several token delays: nothing more may arrive
    assert await last_answer_text(page) == stopped_text
    assert await wait_for_idle_backend(hub.standin) == 0
    assert problems == []


async def save_screenshot(page: Page, tmp_path: Path) -> None:
    path = tmp_path / "chat.png"
    await page.screenshot(path=str(path))
    assert path.stat().st_size > 0
    target = os.environ.get("SAIA_CHAT_SCREENSHOT")
    if target:
        shutil.copyfile(path, target)


async def test_bad_key_and_refusals_are_explained(browser: Browser, hub: HubProcess) -> None:
    page, problems = await open_page(browser, hub)
    await page.locator("#login-dialog").wait_for(state="visible")
    await page.fill("#api-key", "sk-saia-not-a-real-key")
    await page.click("#login-submit")
    await page.locator("#login-error").filter(has_text="not accepted (401)").wait_for()
    assert await page.locator("#login-dialog").is_visible()

    await page.fill("#api-key", hub.key)
    await page.click("#login-submit")
    await page.locator("#login-dialog").wait_for(state="hidden")
    banner = page.locator("#error-banner")
    await page.select_option("#model-select", DOWN_MODEL)
    await send(page, "anyone there?")
    await banner.filter(has_text="502").wait_for()
    assert "cannot reach upstream" in (await banner.text_content() or "")
    failed = page.locator("#messages .message.assistant .message-error").last
    assert "502" in (await failed.text_content() or "")  # also kept with the conversation

    await page.click("#logout")
    await log_in(page, hub.limited_key)
    await page.select_option("#model-select", MODEL)
    await page.click("#new-chat")
    for turn in range(2):  # the key's two requests of the day
        await send(page, f"turn {turn}")
        await watch_answer(page, limit_s=30)
    await send(page, "one too many")
    await banner.filter(has_text="Rate limit reached (429)").wait_for()
    assert re.search(r"Try again in \d+ (s|min|h)\.", await banner.text_content() or "")
    assert problems == []


async def test_single_sign_on_needs_no_key(browser: Browser, hub: HubProcess) -> None:
    page, problems = await open_page(browser, hub, extra_http_headers={SSO_HEADER: "alice"})
    await page.locator("#model-select:not([disabled])").wait_for()
    assert not await page.locator("#login-dialog").is_visible()
    assert await page.locator("#logout").is_hidden()
    await page.select_option("#model-select", MODEL)
    await send(page, "hello from alice")
    samples = await watch_answer(page, limit_s=30)
    assert "hello from alice" in samples[-1]
    assert problems == []


async def test_conversations_persist_and_delete(browser: Browser, hub: HubProcess) -> None:
    page, problems = await open_page(browser, hub)
    await log_in(page, hub.key)
    await page.select_option("#model-select", MODEL)
    await send(page, "first conversation")
    await watch_answer(page, limit_s=30)
    await page.click("#new-chat")
    await send(page, "second conversation")
    await watch_answer(page, limit_s=30)

    await page.reload()  # key and conversations come back from localStorage
    titles = page.locator("#conversation-list .conversation")
    await titles.nth(1).wait_for()
    assert await titles.all_text_contents() == ["second conversation", "first conversation"]
    assert not await page.locator("#login-dialog").is_visible()

    await page.click("#conversation-list .conversation >> text=first conversation")
    assert "echo: first conversation" in await last_answer_text(page)
    await page.click("button[aria-label='Delete conversation: first conversation']")
    assert await titles.all_text_contents() == ["second conversation"]

    # Leaving the page mid-answer: the saved answer is marked stopped, not left streaming.
    await page.click("#new-chat")
    await send(page, " ".join(f"word{index}" for index in range(60)))
    await wait_for_answer_text(page, "word2")
    await page.reload()
    await page.locator("#model-select:not([disabled])").wait_for()
    assert await titles.count() == 2
    answer = page.locator("#messages .message.assistant").last
    assert "stopped" in (await answer.locator(".message-meta").text_content() or "")
    assert "pending" not in (await answer.get_attribute("class") or "")
    assert await wait_for_idle_backend(hub.standin) == 0  # the hub let go of the backend too
    assert problems == []


async def test_answer_broken_mid_stream_is_reported(browser: Browser, hub: HubProcess) -> None:
    page, problems = await open_page(browser, hub)
    await log_in(page, hub.key)
    await page.select_option("#model-select", FRAGILE_MODEL)
    await send(page, " ".join(f"part{index}" for index in range(60)))
    await wait_for_answer_text(page, "part2")
    hub.fragile.proc.kill()  # the model server dies while it answers
    banner = page.locator("#error-banner")
    await banner.filter(has_text="The answer was interrupted").wait_for()
    assert "broke off" in (await banner.text_content() or "")
    assert "part2" in await last_answer_text(page)  # what arrived stays visible
    await page.locator("#send").wait_for(state="visible")
    assert problems == []


def demand_level(demand: object) -> str | None:
    """The page's rule for the hub's demand number, as the issue states it."""
    if isinstance(demand, bool) or not isinstance(demand, int | float):
        return None
    return "low" if demand <= 1 else "medium" if demand <= 3 else "high"


def wait_in_words(seconds: int) -> str:
    """How the page words a Retry-After: seconds under 90 s, minutes under 90 min, else hours."""
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 90 * 60:
        return f"{math.floor(seconds / 60 + 0.5)} min"  # JavaScript's Math.round
    return f"{math.floor(seconds / 3600 + 0.5)} h"


SSE_PAYLOADS = [
    '{"choices":[{"delta":{"content":"a"}}]}',
    '{"choices":[{"delta":{"content":"two\\nlines"}}]}',
    "first line\nsecond line",  # one event with two data lines
    '{"object":"error","error":{"message":"x"}}',
    "[DONE]",
]


CHUNK_A = '{"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"a"}}]}'
USAGE = '{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}'
STREAM_ERROR = '{"object":"error","error":{"message":"backend lost","type":"server_error"}}'


def sse_text(payloads: list[str]) -> str:
    """Events as servers send them: comments, CRLF and LF line ends, optional space."""
    parts = [": keep-alive comment\n\n"]
    for index, payload in enumerate(payloads):
        lines = [f"data:{' ' if index % 2 else ''}{line}" for line in payload.split("\n")]
        end = "\r\n" if index % 2 else "\n"
        parts.append(end.join(lines) + end + end)
    return "".join(parts)


async def test_page_logic_in_the_browser(browser: Browser, hub: HubProcess) -> None:
    """The page's pure modules (SSE parsing, demand levels, Retry-After), run by chromium."""
    page, problems = await open_page(browser, hub)
    text = sse_text(SSE_PAYLOADS)
    splits = await page.evaluate(
        """async (text) => {
            const { SseParser } = await import(new URL("sse.js", location.href));
            const results = [];
            for (let cut = 0; cut <= text.length; cut++) {
                const parser = new SseParser();
                results.push([...parser.push(text.slice(0, cut)), ...parser.push(text.slice(cut)),
                              ...parser.finish()]);
            }
            const unterminated = new SseParser();
            results.push([...unterminated.push("data: last"), ...unterminated.finish()]);
            return results;
        }""",
        text,
    )
    assert all(result == SSE_PAYLOADS for result in splits[:-1]), splits[:3]
    assert splits[-1] == ["last"]

    values: list[object] = [0, 0.5, 1, 1.01, 2, 3, 3.001, 4.5, 5, 5.5, 40, None, "2", True]
    levels = await page.evaluate(
        """async (values) => {
            const { demandLevel } = await import(new URL("models.js", location.href));
            return values.map(demandLevel);
        }""",
        values,
    )
    assert levels == [demand_level(value) for value in values]

    now_ms = 1_800_000_000_000
    retry = await page.evaluate(
        """async (now) => {
            const { parseRetryAfter } = await import(new URL("api.js", location.href));
            const date = new Date(now + 30000).toUTCString();
            return [parseRetryAfter("17", now), parseRetryAfter(date, now),
                    parseRetryAfter("soon", now), parseRetryAfter(null, now)];
        }""",
        now_ms,
    )
    assert retry == [17, 30, None, None]

    streams = {
        "complete": sse_text([CHUNK_A, USAGE, "[DONE]"]),
        "error in stream": sse_text([CHUNK_A, STREAM_ERROR, "[DONE]"]),
        "cut off": sse_text([CHUNK_A]),
    }
    outcomes = await page.evaluate(
        """async (streams) => {
            const { readEvents } = await import(new URL("api.js", location.href));
            const outcomes = {};
            for (const [name, text] of Object.entries(streams)) {
                const body = new Response(text).body;
                const events = [];
                try {
                    for await (const event of readEvents(body)) events.push(event);
                    outcomes[name] = { events, error: null };
                } catch (error) {
                    outcomes[name] = { events, error: [error.kind, error.message] };
                }
            }
            return outcomes;
        }""",
        streams,
    )
    first = {"content": "a", "reasoning": ""}
    usage = {"usage": json.loads(USAGE)["usage"]}
    assert outcomes["complete"] == {"events": [first, usage], "error": None}
    message = json.loads(STREAM_ERROR)["error"]["message"]
    assert outcomes["error in stream"] == {"events": [first], "error": ["stream", message]}
    assert outcomes["cut off"]["events"] == [first]
    assert outcomes["cut off"]["error"][0] == "stream"

    waits = [0, 45, 89, 90, 150, 600, 5399, 5400, 9000, 86399]
    words = await page.evaluate(
        """async (waits) => {
            const { formatWait } = await import(new URL("api.js", location.href));
            return waits.map(formatWait);
        }""",
        waits,
    )
    assert words == [wait_in_words(seconds) for seconds in waits]

    unnamed = await page.evaluate(
        """() => [...document.querySelectorAll("button, select, textarea, input")]
            .filter((element) => !(element.labels?.length || element.getAttribute("aria-label")
                                   || element.textContent.trim()))
            .map((element) => element.outerHTML)"""
    )
    assert unnamed == []  # every control has an accessible name
    assert problems == []
