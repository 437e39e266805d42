"""The chat page says that a model is busy and for about how long (issue 11), in chromium."""

from __future__ import annotations

import json

from playwright.async_api import Browser

from tests.hub.web.test_chat_page import HubProcess, browser, hub, open_page  # noqa: F401

BUSY = {
    "error": {
        "message": "fair is busy: no slot became free within 300 s; retry in about 12 s",
        "type": "service_unavailable",
        "code": "model_busy",
    }
}


async def test_a_busy_model_is_explained_with_the_wait(browser: Browser, hub: HubProcess) -> None:  # noqa: F811
    page, problems = await open_page(browser, hub)
    texts = await page.evaluate(
        """async ([busy, loading]) => {
            const { responseError, describeError } = await import(new URL("api.js", location.href));
            const answer = (body, status, wait) =>
                new Response(body, { status, headers: { "Retry-After": wait } });
            const one = await responseError(answer(busy, 503, "12"));
            const two = await responseError(answer(loading, 503, "30"));
            return [one.kind, describeError(one, "Fair"), two.kind];
        }""",
        [json.dumps(BUSY), json.dumps({"error": {"message": "starting", "code": "model_loading"}})],
    )
    kind, text, other = texts
    assert kind == "busy" and other == "loading"
    assert text.startswith("Fair is busy") and "Try again in 12 s." in text
    assert not problems
