"""Upstream: models served by saia agents on HPC login nodes, over the SSH hop.

One HopClient per site, all owned by this upstream's lifetime (`async with`). A request goes
to the first site that takes it: a site that is unavailable before the response started
(HopUnavailable) is skipped and the next one tried; one whose connection broke after the
request went out but before the answer started (HopLost) is tried once more on its new
connection, after the others. The agents' live service state
(`HopClient.services()`) is cached for `services_ttl` seconds and merged over sites.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any

from hub.config import HpcSite, HpcUpstreamConfig
from hub.upstreams import tracing
from hub.upstreams.base import (
    ModelState,
    ModelStatus,
    UpstreamError,
    UpstreamRequest,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamUnavailable,
    idle_limited,
)
from hub.upstreams.hop_client import (
    HopClient,
    HopError,
    HopLost,
    HopResponse,
    HopTarget,
    HopTimeout,
    HopUnavailable,
)
from saia.base.protocol import Caller

log = logging.getLogger(__name__)

FAILED_SITE_COOLDOWN = 30.0
STATE_RETRY = 5.0
_RANK: dict[str, int] = {"ready": 2, "loading": 1, "offline": 0}


def merge_states(reports: list[list[dict[str, Any]]]) -> dict[str, ModelState]:
    """Per service id, the best status over sites and the lowest demand at that status;
    instances and starting jobs are summed over sites; the predicted wait is the soonest."""
    merged: dict[str, ModelState] = {}
    counts: dict[str, tuple[int, int]] = {}
    waits: dict[str, float] = {}
    for report in reports:
        for entry in report:
            service, status = entry.get("id"), entry.get("status")
            demand = entry.get("demand", 0.0)
            if not isinstance(service, str) or status not in _RANK:
                continue
            if not isinstance(demand, int | float):
                demand = 0.0
            name = entry.get("name")
            queued, oldest = entry.get("queued", 0), entry.get("oldest_wait", 0.0)
            state = ModelState(
                status,
                float(demand),
                name if isinstance(name, str) else None,
                queued if isinstance(queued, int) and not isinstance(queued, bool) else 0,
                float(oldest) if isinstance(oldest, int | float) else 0.0,
                _names(entry.get("endpoints")),
                _names(entry.get("input")),
                _names(entry.get("output")),
            )
            wait = _seconds(entry.get("predicted_wait"))
            if wait is not None:
                waits[service] = min(wait, waits.get(service, wait))
            ready, starting = counts.get(service, (0, 0))
            counts[service] = (
                ready + _count(entry, "instances"),
                starting + _count(entry, "starting"),
            )
            old = merged.get(service)
            if old is None or (_RANK[status], -state.demand) > (_RANK[old.status], -old.demand):
                merged[service] = state
    return {
        k: replace(v, instances=counts[k][0], starting=counts[k][1], predicted_wait=waits.get(k))
        for k, v in merged.items()
    }


def _seconds(value: Any) -> float | None:
    """A predicted wait from an agent's listing; None when absent or not a duration."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    return None


def _count(entry: dict[str, Any], key: str) -> int:
    value = entry.get(key, 0)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _names(value: Any) -> tuple[str, ...] | None:
    """A list of short names from an agent's listing; None when it is not one."""
    if not isinstance(value, list) or len(value) > 64:
        return None
    return tuple(v for v in value if isinstance(v, str) and 0 < len(v) <= 64)


def site_order(failed_at: list[float | None], now: float, cooldown: float) -> list[int]:
    """Sites in configured order, those that failed within `cooldown` moved to the end.

    A site that is down would otherwise cost every request its connect timeout.
    """
    recent = [i for i, t in enumerate(failed_at) if t is not None and now - t < cooldown]
    return [i for i in range(len(failed_at)) if i not in recent] + recent


def sites_to_ask(failed_at: list[float | None], now: float, retry: float) -> list[int]:
    """Sites to ask for their live state: a site that failed less than `retry` seconds ago
    is skipped, so /v1/models never waits for a dead site more than once per `retry`."""
    return [i for i, t in enumerate(failed_at) if t is None or now - t >= retry]


def target_of(site: HpcSite) -> HopTarget:
    return HopTarget(
        host=site.host,
        port=site.port,
        user=site.user,
        client_key=site.client_key or Path(),
        known_hosts=site.known_hosts or Path(),
        connections=site.connections,
        socket=site.socket,
    )


class HpcUpstream:
    default_status: ModelStatus = "offline"
    usage_per_chunk = True  # the agents serve vLLM (or the stand-in, which answers alike)

    def __init__(self, name: str, config: HpcUpstreamConfig) -> None:
        self.name = name
        self._config = config
        self._clients = [
            HopClient(target_of(site), connect_timeout=config.timeouts.connect)
            for site in config.sites
        ]
        self._stack = AsyncExitStack()
        self._cached: tuple[float, dict[str, ModelState]] | None = None
        self._failed_at: list[float | None] = [None] * len(self._clients)

    async def __aenter__(self) -> HpcUpstream:
        async with AsyncExitStack() as stack:
            for client in self._clients:
                await stack.enter_async_context(client)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._stack.aclose()

    def site_client(self, index: int) -> HopClient:
        """The hop to one site (batches talk to the agent of the site that runs them)."""
        return self._clients[index]

    @asynccontextmanager
    async def stream(self, request: UpstreamRequest) -> AsyncIterator[UpstreamResponse]:
        async with AsyncExitStack() as stack:
            response = await self._open(request, stack)
            chunks = idle_limited(self._body(response), self._config.timeouts.idle, self.name)
            yield UpstreamResponse(response.status, response.headers, chunks)

    async def _open(self, request: UpstreamRequest, stack: AsyncExitStack) -> HopResponse:
        """The first site's response; unavailable sites (nothing sent yet) are skipped.

        A site whose connection broke after the request went out but before any of the
        answer came back (HopLost) is tried once more, after the other sites: its client
        reconnects at once, and the client saw nothing of the answer, so it loses nothing.
        A streamed body (an upload) is sent once: once a piece of it went out, no retry.
        """
        if not isinstance(request.body, bytes):
            request = replace(request, body=_OnePass(request.body))
        failures: list[str] = []
        now = asyncio.get_running_loop().time()
        queue = deque(site_order(self._failed_at, now, FAILED_SITE_COOLDOWN))
        retried: set[int] = set()
        while queue:
            index = queue.popleft()
            try:
                return await self._open_at(index, request, stack)
            except HopUnavailable as error:
                self._failed_at[index] = asyncio.get_running_loop().time()
                failures.append(f"{self._config.sites[index].host}: {error}")
                if isinstance(request.body, _OnePass) and request.body.started:
                    break
                if isinstance(error, HopLost) and index not in retried:
                    retried.add(index)
                    queue.append(index)
        log.warning("no site of %s took the request: %s", self.name, "; ".join(failures))
        raise UpstreamUnavailable(503, f"no HPC site of {self.name} is reachable now")

    async def _open_at(
        self, index: int, request: UpstreamRequest, stack: AsyncExitStack
    ) -> HopResponse:
        """The response of one site; HopUnavailable when it cannot take the request."""
        headers = [("content-type", request.content_type), ("x-request-id", request.request_id)]
        site, client = self._config.sites[index], self._clients[index]
        opened = client.stream(
            request.model,
            request.method,
            request.path,
            headers,
            request.body,
            first_byte_timeout=self._config.timeouts.first_byte,
            caller=Caller(request.user, request.key_id, request.group, request.priority),
            traceparent=tracing.traceparent(),  # "" unless tracing is on
        )
        try:
            response = await stack.enter_async_context(opened)
        except HopUnavailable:
            raise
        except HopTimeout:
            raise UpstreamTimeout(f"{site.host} did not answer in time") from None
        except HopError as error:
            raise UpstreamError(error.status, str(error)) from None
        self._failed_at[index] = None
        return response

    async def _body(self, response: HopResponse) -> AsyncIterator[bytes]:
        try:
            async for chunk in response.aiter_bytes():
                yield chunk
        except HopError as error:
            raise UpstreamError(error.status, str(error)) from None

    async def states(self) -> dict[str, ModelState]:
        now = asyncio.get_running_loop().time()
        if self._cached is not None and self._cached[0] > now:
            return self._cached[1]
        asked = sites_to_ask(self._failed_at, now, STATE_RETRY)
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(self._site_services(i)) for i in asked]
        merged = merge_states([task.result() for task in tasks])
        self._cached = (now + self._config.services_ttl, merged)
        return merged

    async def _site_services(self, index: int) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._config.timeouts.connect):
                services = await self._clients[index].services()
        except (HopError, TimeoutError) as error:
            self._failed_at[index] = loop.time()
            log.warning("%s: no service state from a site: %s", self.name, error)
            return []
        self._failed_at[index] = None
        return services


class _OnePass:
    """A body that streams in, which can be sent once: `started` when a piece was asked."""

    __slots__ = ("_pieces", "started")

    def __init__(self, pieces: AsyncIterable[bytes]) -> None:
        self._pieces, self.started = pieces, False

    def __aiter__(self) -> AsyncIterator[bytes]:
        self.started = True
        return aiter(self._pieces)
