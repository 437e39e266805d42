"""The fairness scenario (issue 11): one heavy user with many streams, a few light users.

`run_scenario(Scenario(...))` runs against a hub: the light users alone first, then the
heavy user's `heavy_streams` concurrent streams (each sends its next request as soon as
one ends) while every light user sends `rounds` streamed requests one after the other with
a short pause. Time to first token (TTFT) is from sending to the first chunk that carries
generated text. Used by tests/faults/test_fairness.py (asserts) and bench/fairness.py
(prints). Every loop is bounded by a count and every request by its own timeout.
"""

from __future__ import annotations

import asyncio
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx

PROMPT = "one two three four"


@dataclass(frozen=True)
class Scenario:
    url: str
    model: str
    heavy_key: str
    light_keys: Sequence[str]
    heavy_streams: int = 64
    rounds: int = 6  # requests per light user
    pause: float = 0.1  # between a light user's requests
    max_tokens: int = 10
    warmup: float = 1.0  # the heavy user's head start (fills the slots and the queue)
    timeout: float = 60.0


@dataclass
class Figures:
    light_ttft: list[float] = field(default_factory=list)  # seconds
    heavy_tokens: int = 0
    light_tokens: int = 0
    seconds: float = 0.0  # the light users' measured window
    failures: list[str] = field(default_factory=list)

    def quantile(self, q: float) -> float:
        ordered = sorted(self.light_ttft)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

    @property
    def median(self) -> float:
        return statistics.median(self.light_ttft) if self.light_ttft else float("nan")

    @property
    def heavy_rate(self) -> float:
        return self.heavy_tokens / self.seconds if self.seconds else 0.0

    @property
    def total_rate(self) -> float:
        return (self.heavy_tokens + self.light_tokens) / self.seconds if self.seconds else 0.0


async def one_stream(
    client: httpx.AsyncClient, scenario: Scenario, key: str
) -> tuple[float | None, int]:
    """Send one streamed request; its time to first token and its tokens (None: failed)."""
    loop = asyncio.get_running_loop()
    body = {
        "model": scenario.model,
        "stream": True,
        "max_tokens": scenario.max_tokens,
        "messages": [{"role": "user", "content": PROMPT}],
    }
    started, first, tokens = loop.time(), None, 0
    async with asyncio.timeout(scenario.timeout):
        headers = {"authorization": f"Bearer {key}"}
        async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                await r.aread()
                raise RuntimeError(f"{r.status_code} {r.text[:200]}")
            async for line in r.aiter_lines():
                if _has_text(line):
                    tokens += 1
                    first = first if first is not None else loop.time() - started
    return first, tokens


def _has_text(line: str) -> bool:
    if not line.startswith("data: {"):
        return False
    try:
        choices = json.loads(line[6:]).get("choices") or [{}]
    except ValueError:
        return False
    return bool((choices[0].get("delta") or {}).get("content"))


async def _light_user(
    client: httpx.AsyncClient, scenario: Scenario, key: str, figures: Figures
) -> None:
    for _ in range(scenario.rounds):
        try:
            first, tokens = await one_stream(client, scenario, key)
        except (httpx.HTTPError, RuntimeError, TimeoutError) as error:
            figures.failures.append(f"light: {type(error).__name__} {error}")
            continue
        if first is not None:
            figures.light_ttft.append(first)
        figures.light_tokens += tokens
        await asyncio.sleep(scenario.pause)


async def _heavy_stream(
    client: httpx.AsyncClient, scenario: Scenario, figures: Figures, stop: asyncio.Event
) -> None:
    for _ in range(10_000):  # bounded; ends when the light users are done
        if stop.is_set():
            return
        try:
            _, tokens = await one_stream(client, scenario, scenario.heavy_key)
        except (httpx.HTTPError, RuntimeError, TimeoutError) as error:
            figures.failures.append(f"heavy: {type(error).__name__} {error}")
            await asyncio.sleep(0.1)
            continue
        if figures.seconds == 0.0 and not stop.is_set():
            figures.heavy_tokens += tokens  # counted while the light users are measured


async def run_scenario(scenario: Scenario, heavy: bool = True) -> Figures:
    """The light users' TTFT (and tokens/s of all) with or without the heavy user."""
    figures = Figures()
    loop = asyncio.get_running_loop()
    streams = scenario.heavy_streams + len(scenario.light_keys)
    limits = httpx.Limits(max_connections=streams, max_keepalive_connections=streams)
    stop = asyncio.Event()
    async with (
        httpx.AsyncClient(base_url=scenario.url, limits=limits, trust_env=False) as client,
        asyncio.TaskGroup() as group,
    ):
        if heavy:
            for _ in range(scenario.heavy_streams):
                group.create_task(_heavy_stream(client, scenario, figures, stop))
            await asyncio.sleep(scenario.warmup)
        figures.heavy_tokens = 0
        started = loop.time()
        async with asyncio.TaskGroup() as lights:
            for key in scenario.light_keys:
                lights.create_task(_light_user(client, scenario, key, figures))
        figures.seconds = loop.time() - started
        stop.set()
    return figures


def describe(name: str, figures: Figures) -> str:
    return (
        f"{name:>12}: light TTFT p50 {figures.median * 1000:7.0f} ms, "
        f"p95 {figures.quantile(0.95) * 1000:7.0f} ms ({len(figures.light_ttft)} requests); "
        f"heavy {figures.heavy_rate:6.1f} tokens/s, all {figures.total_rate:6.1f} tokens/s; "
        f"{len(figures.failures)} failures"
    )
