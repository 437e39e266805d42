"""Make docs/screenshot-chat.png: the chat page answering with a real model.

    .venv/bin/saia demo --vllm     # elsewhere; prints SAIA_BASE_URL and SAIA_API_KEY
    .venv/bin/python docs/screenshot_chat.py "$SAIA_BASE_URL" "$SAIA_API_KEY" [OUT.png]

Drives Debian's chromium with Playwright (never `playwright install`): logs in with the
key, picks SmolLM2, asks two questions, waits until each answer is complete (its usage
line shown), then takes the screenshot. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from playwright.async_api import Error, Page, async_playwright

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
MODEL = "smollm2-135m-instruct"
QUESTIONS = [
    "What is the capital of France? Answer in one word.",
    "Give me three tips for a good night's sleep, as a short Markdown list.",
]
ANSWER_TIMEOUT_MS = 120_000


async def ask(page: Page, question: str, answered: int) -> None:
    """Send `question`; return once the page shows its answer's usage line."""
    await page.fill("#prompt", question)
    await page.press("#prompt", "Enter")
    await page.wait_for_function(
        """(count) => Array.from(document.querySelectorAll(
            '#messages .message.assistant .message-meta'))
            .filter((meta) => meta.textContent.includes('answer tokens')).length >= count""",
        arg=answered,
        timeout=ANSWER_TIMEOUT_MS,
    )


async def screenshot(base_url: str, key: str, out: Path) -> None:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            context = await browser.new_context(viewport={"width": 1200, "height": 760})
            page = await context.new_page()
            page.set_default_timeout(30_000)
            await page.goto(base_url.removesuffix("/v1") + "/chat/")
            await page.fill("#api-key", key)
            await page.click("#login-submit")
            await page.locator("#login-dialog").wait_for(state="hidden")
            await page.select_option("#model-select", MODEL)
            for count, question in enumerate(QUESTIONS, start=1):
                await ask(page, question, count)
            await page.screenshot(path=str(out))
        finally:
            await browser.close()


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    out = Path(argv[2]) if len(argv) == 3 else Path(__file__).with_name("screenshot-chat.png")
    try:
        asyncio.run(screenshot(argv[0], argv[1], out))
    except Error as error:  # Playwright's own: an unreachable page, a timeout
        print(f"screenshot_chat: {error.message.splitlines()[0]}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
