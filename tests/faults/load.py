"""A bounded load generator for the fault tests: it classifies every request it sends.

`run_load(Load(...))` (or `async with loaded(Load(...)) as result:` in the background) runs
`clients` concurrent clients against the hub's chat API, taking
turns over several API keys (users), streamed and non-streamed requests alternating, until
`requests` were sent or `duration` seconds passed (at least one bound is required), each
request under its own `timeout`. Every request ends as exactly one of:

- ok: status 200 and a whole answer (JSON with choices and usage; or SSE ending in [DONE]
  without an error event);
- before_first_byte: no answer started (an error status, or the connection failed first);
- mid_stream: a 200 answer started, then broke off or ended with an error event;
- hung: nothing decided within the request's own timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import httpx

from tests.hpc.helpers import until

Kind = Literal["ok", "before_first_byte", "mid_stream", "hung"]
KINDS: tuple[Kind, ...] = ("ok", "before_first_byte", "mid_stream", "hung")
PROMPT = " ".join(f"word{i}" for i in range(64))  # the stand-in answers one token per word


@dataclass(frozen=True)
class Load:
    url: str  # the hub, e.g. http://127.0.0.1:8000
    model: str
    keys: Sequence[str]
    clients: int = 8
    requests: int | None = None
    duration: float | None = None
    timeout: float = 60.0
    max_tokens: int = 16
    stream_every: int = 2  # every n-th request is streamed (1: all, 0: none)

    def __post_init__(self) -> None:
        if self.requests is None and self.duration is None:
            raise ValueError("a load needs a request count or a duration (or both)")


@dataclass
class Outcome:
    index: int
    user: int  # index into Load.keys
    stream: bool
    kind: Kind = "hung"
    status: int | None = None
    request_id: str | None = None
    started: float = 0.0  # event-loop time
    answered: float | None = None  # when a 200 response head arrived
    ended: float | None = None
    detail: str = ""


@dataclass
class LoadResult:
    outcomes: list[Outcome] = field(default_factory=list)

    def count(self, kind: Kind) -> int:
        return sum(1 for o in self.outcomes if o.kind == kind)

    def of(self, kind: Kind) -> list[Outcome]:
        return [o for o in self.outcomes if o.kind == kind]

    def pending(self, *, answered: bool) -> list[Outcome]:
        """Requests not ended yet (while the load runs): answering, or still waiting."""
        return [
            o for o in self.outcomes if o.ended is None and (o.answered is not None) == answered
        ]

    def summary(self) -> str:
        counts = Counter(o.kind for o in self.outcomes)
        details = Counter(o.detail for o in self.outcomes if o.kind != "ok")
        return f"{dict(counts)} {dict(details.most_common(5))}"


async def run_load(
    load: Load, result: LoadResult | None = None, stop: asyncio.Event | None = None
) -> LoadResult:
    """Send the load; returns when its bound is reached (or `stop` is set) and every
    request sent has ended (each within its own timeout).

    Each request is in `result.outcomes` from its start (pass a `result` to watch it live:
    `ended` is None until the request has ended)."""
    loop = asyncio.get_running_loop()
    until = None if load.duration is None else loop.time() + load.duration
    numbers = itertools.count()
    result = LoadResult() if result is None else result
    limits = httpx.Limits(max_connections=load.clients, max_keepalive_connections=load.clients)
    timeout = httpx.Timeout(load.timeout)

    def next_index() -> int | None:
        index = next(numbers)
        if load.requests is not None and index >= load.requests:
            return None
        if (until is not None and loop.time() >= until) or (stop and stop.is_set()):
            return None
        return index

    async def client_loop(client: httpx.AsyncClient) -> None:
        while (index := next_index()) is not None:
            user = index % len(load.keys)
            stream = load.stream_every > 0 and index % load.stream_every == 0
            outcome = Outcome(index, user, stream, started=loop.time())
            result.outcomes.append(outcome)
            await one_request(client, load, outcome)

    async with (
        httpx.AsyncClient(
            base_url=load.url, limits=limits, timeout=timeout, trust_env=False
        ) as client,
        asyncio.TaskGroup() as group,
    ):
        for _ in range(load.clients):
            group.create_task(client_loop(client))
    result.outcomes.sort(key=lambda o: o.index)
    return result


@contextlib.asynccontextmanager
async def loaded(load: Load, stop: asyncio.Event | None = None) -> AsyncIterator[LoadResult]:
    """Runs `load` in the background (until its bound, or `stop` is set); on exit waits
    until all of its requests ended."""
    result = LoadResult()
    task = asyncio.create_task(run_load(load, result, stop))
    try:
        yield result
        await task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def streams_answering(result: LoadResult) -> int:
    """Streamed requests of a running load whose answer has started and not ended."""
    return sum(1 for o in result.pending(answered=True) if o.stream)


async def streams_started(result: LoadResult, count: int = 2, limit_s: float = 30.0) -> None:
    """Until `count` streams of the running load are being answered (for a fault to cut)."""
    await until(lambda: streams_answering(result) >= count, limit_s, "no stream being answered")


async def one_request(client: httpx.AsyncClient, load: Load, outcome: Outcome) -> None:
    """Send one request and fill in its outcome."""
    loop = asyncio.get_running_loop()
    stream = outcome.stream
    body = {
        "model": load.model,
        "max_tokens": load.max_tokens,
        "stream": stream,
        "messages": [{"role": "user", "content": PROMPT}],
    }
    headers = {"authorization": f"Bearer {load.keys[outcome.user]}"}
    received = bytearray()
    try:
        async with asyncio.timeout(load.timeout):
            async with client.stream(
                "POST", "/v1/chat/completions", json=body, headers=headers
            ) as response:
                outcome.status = response.status_code
                outcome.request_id = response.headers.get("x-request-id")
                if response.status_code == 200:
                    outcome.answered = loop.time()
                async for chunk in response.aiter_bytes():
                    received += chunk
        outcome.kind, outcome.detail = judge(outcome.status, stream, bytes(received))
    except TimeoutError:
        outcome.kind, outcome.detail = "hung", f"no end within {load.timeout:.0f} s"
    except httpx.HTTPError as error:
        outcome.kind = "mid_stream" if outcome.answered is not None else "before_first_byte"
        outcome.detail = type(error).__name__
    outcome.ended = loop.time()


def judge(status: int, stream: bool, body: bytes) -> tuple[Kind, str]:
    """The kind of a request that ended, from what its client received."""
    if status != 200:
        return "before_first_byte", f"{status} {_error_code(body)}"
    if not stream:
        try:
            answer = json.loads(body)
        except ValueError:
            return "mid_stream", "200 with a broken JSON body"
        whole = isinstance(answer, dict) and answer.get("choices") and answer.get("usage")
        return ("ok", "") if whole else ("mid_stream", "200 without choices and usage")
    events = [
        line[6:] for line in body.decode(errors="replace").splitlines() if line[:6] == "data: "
    ]
    for event in events:
        if '"error"' in event:
            return "mid_stream", f"error event: {_error_code(event.encode())}"
    if not events or events[-1].strip() != "[DONE]":
        return "mid_stream", "stream ended without [DONE]"
    return "ok", ""


def _error_code(body: bytes) -> str:
    try:
        error = json.loads(body).get("error", {})
        return str(error.get("code") or error.get("type") or "")[:40]
    except (ValueError, AttributeError):
        return ""
