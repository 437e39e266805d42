"""The load that `python -m bench` sends: bounded in count and time, loopback only.

A `Path` is where a request goes (the stand-in directly, or a hub). `Client` wraps the
HTTP client that sends it: saia's own (saia/base/http11.py, cheap, so that the client
steals little CPU from what is measured) or aiohttp's, for the comparison of the two.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from saia.base.http11 import ConnectFailed, HttpClient, ResponseBroken

IDLE = 120.0  # longest gap between two chunks of an answer


@dataclass(frozen=True)
class Path:
    name: str
    base_url: str
    key: str | None = None

    def headers(self) -> list[tuple[str, str]]:
        auth = [("authorization", f"Bearer {self.key}")] if self.key else []
        return [("content-type", "application/json"), *auth]


@dataclass
class Answer:
    ok: bool
    total: float  # seconds from sending to the last byte
    first: float = 0.0  # seconds to the first body chunk
    events: int = 0  # `data:` lines of an event stream
    error: str = ""


def chat_body(model: str, tokens: int, stream: bool) -> bytes:
    """A chat request the stand-in answers with `tokens` tokens (it echoes the words)."""
    words = " ".join(f"w{i}" for i in range(max(0, tokens - 1)))
    body = {
        "model": model,
        "max_tokens": tokens,
        "stream": stream,
        "messages": [{"role": "user", "content": words or "hi"}],
    }
    return json.dumps(body).encode()


Send = Callable[[Path, bytes], Awaitable[Answer]]


def error_code(body: bytes) -> str:
    """The `code` (else `type`) of an OpenAI error body, to tell refusals apart."""
    try:
        error = json.loads(body)["error"]
        return str(error.get("code") or error.get("type"))
    except (ValueError, KeyError, TypeError, AttributeError):
        return body[:60].decode(errors="replace")


class SaiaClient:
    """saia/base/http11.py's client (the one the router and the hub use)."""

    name = "saia http11"

    def __init__(self) -> None:
        self.http = HttpClient(connect_timeout=30, max_idle_per_origin=20000)

    async def send(self, path: Path, body: bytes) -> Answer:
        start = time.perf_counter()
        first, events, last = 0.0, 0, b""
        try:
            url = f"{path.base_url}/v1/chat/completions"
            async with self.http.stream("POST", url, path.headers(), body) as response:
                async for chunk in response.chunks(IDLE):
                    first = first or time.perf_counter() - start
                    events += chunk.count(b"data: ")
                    last = chunk
        except (ConnectFailed, ResponseBroken, TimeoutError, OSError) as error:
            return Answer(False, time.perf_counter() - start, error=type(error).__name__)
        ok = response.status == 200
        failure = "" if ok else f"HTTP {response.status} {error_code(last)}"
        return Answer(ok, time.perf_counter() - start, first, events, failure)

    async def aclose(self) -> None:
        await self.http.__aexit__(None, None, None)


class AiohttpClient:
    """aiohttp's client, configured for many concurrent keep-alive requests."""

    name = "aiohttp"

    def __init__(self) -> None:
        import aiohttp

        self.aiohttp = aiohttp
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30)
        timeout = aiohttp.ClientTimeout(total=None, sock_read=IDLE)
        self.session = aiohttp.ClientSession(connector=connector, timeout=timeout)

    async def send(self, path: Path, body: bytes) -> Answer:
        start = time.perf_counter()
        first, events = 0.0, 0
        url = f"{path.base_url}/v1/chat/completions"
        try:
            async with self.session.post(url, data=body, headers=path.headers()) as response:
                async for chunk in response.content.iter_any():
                    first = first or time.perf_counter() - start
                    events += chunk.count(b"data: ")
                status = response.status
        except (self.aiohttp.ClientError, TimeoutError, OSError) as error:
            return Answer(False, time.perf_counter() - start, error=type(error).__name__)
        ok = status == 200
        failure = "" if ok else f"HTTP {status}"
        return Answer(ok, time.perf_counter() - start, first, events, failure)

    async def aclose(self) -> None:
        await self.session.close()


@dataclass
class Batch:
    """What a group of requests gave: their answers and the wall time they took."""

    answers: list[Answer] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def errors(self) -> int:
        return sum(not a.ok for a in self.answers)

    def ok_times_ms(self) -> list[float]:
        return [a.total * 1000 for a in self.answers if a.ok]

    def error_kinds(self) -> dict[str, int]:
        kinds: dict[str, int] = {}
        for answer in self.answers:
            if not answer.ok:
                kinds[answer.error] = kinds.get(answer.error, 0) + 1
        return kinds


async def sequential(send: Send, path: Path, body: bytes, count: int) -> Batch:
    batch, start = Batch(), time.perf_counter()
    for _ in range(count):
        batch.answers.append(await send(path, body))
    batch.seconds = time.perf_counter() - start
    return batch


async def concurrent(send: Send, path: Path, body: bytes, width: int, total: int) -> Batch:
    """`total` requests, `width` in flight at any time."""
    batch, todo = Batch(), iter(range(total))

    async def worker() -> None:
        for _ in todo:
            batch.answers.append(await send(path, body))

    return await _workers(batch, width, worker)


async def at_once(
    send: Send, path: Path, body: bytes, count: int, ramp_s: float, limit_s: float
) -> Batch:
    """`count` requests started within `ramp_s` (evenly), all running together when the
    answers last longer; one that has not ended within `limit_s` counts as an error."""
    batch, start = Batch(), time.perf_counter()

    async def one(index: int) -> None:
        await asyncio.sleep(ramp_s * index / count)
        try:
            async with asyncio.timeout(limit_s):
                batch.answers.append(await send(path, body))
        except TimeoutError:
            batch.answers.append(Answer(False, limit_s, error="too slow"))

    async with asyncio.TaskGroup() as group:
        for index in range(count):
            group.create_task(one(index))
    batch.seconds = time.perf_counter() - start
    return batch


async def soak(send: Send, path: Path, body: bytes, width: int, seconds: float) -> Batch:
    """`width` workers send one request after another until `seconds` have passed."""
    batch = Batch()
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        while time.monotonic() < deadline:
            batch.answers.append(await send(path, body))

    return await _workers(batch, width, worker)


async def _workers(
    batch: Batch, width: int, worker: Callable[[], Coroutine[Any, Any, None]]
) -> Batch:
    """`width` copies of `worker` at once; the batch with the time they took together."""
    start = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(width):
            group.create_task(worker())
    batch.seconds = time.perf_counter() - start
    return batch
