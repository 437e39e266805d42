"""The hub's side of the SSH hop: request streams to one login node's agent.

`HopClient` keeps `target.connections` SSH connections to the login node, each with one
long-lived exec channel running the forced command (the relay), which speaks
`saia.base.protocol` with the agent's router (one connection: `hub/upstreams/hop_link.py`). Every
request is one stream on such a channel, so hundreds run concurrently over one connection
(OpenSSH's MaxSessions does not apply). The host key is checked against the pinned
known_hosts file. A lost connection is re-established at once, then with exponential
back-off and jitter while connecting fails; requests wait (bounded) for it.

Errors: HopUnavailable (no connection, or it was lost before the response started: the
caller may retry elsewhere), HopLost (a HopUnavailable after the request was sent: it may
be sent again on the new connection), HopTimeout (no response in time), HopError (anything
else, including a break after the response started).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import AsyncIterable
from types import TracebackType
from typing import Any

from hub.upstreams.hop_link import (
    PROBE_AFTER,
    PROBE_TIMEOUT,
    HopError,
    HopLost,
    HopTarget,
    HopTimeout,
    HopUnavailable,
    Link,
    connect,
)
from hub.upstreams.hop_request import HopResponse, send_unless_answered
from saia.base import protocol as wire
from saia.base.handover import RETIRING_HEADER
from saia.base.mux import Lost, StreamClosed, StreamState

__all__ = [
    "HopClient",
    "HopError",
    "HopLost",
    "HopResponse",
    "HopStream",
    "HopTarget",
    "HopTimeout",
    "HopUnavailable",
]

log = logging.getLogger(__name__)
BACKOFF_START = 0.2
BACKOFF_MAX = 30.0
STABLE_AFTER = 5.0  # seconds a connection must live to reset the back-off


class HopClient:
    """Request streams to one login node; one per node, owned by the hub's lifespan."""

    def __init__(
        self,
        target: HopTarget,
        *,
        connect_timeout: float = 10,
        keepalive_interval: float = 15,
        probe: tuple[float, float] = (PROBE_AFTER, PROBE_TIMEOUT),
    ) -> None:
        self.target = target
        self._connect_timeout = connect_timeout
        self._keepalive_interval = keepalive_interval
        self._probe = probe  # silence with requests waiting before a PING; its answer time
        self._links: list[Link | None] = [None] * max(1, target.connections)
        self._supervisors: list[asyncio.Task[None]] = []
        self._changed = asyncio.Event()
        self._last_error = "not connected yet"
        # A link whose agent is handing over to a new one (saia/base/handover.py): set when
        # it retires, so its slot connects anew while it finishes its streams (_draining).
        self._retired: dict[Link, tuple[float, asyncio.Event]] = {}
        self._draining: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> HopClient:
        for slot in range(len(self._links)):
            self._supervisors.append(asyncio.create_task(self._supervise(slot)))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        tasks = [*self._supervisors, *self._draining]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._supervisors.clear()

    # -- connections ------------------------------------------------------------------
    async def _supervise(self, slot: int) -> None:
        """Keep one connection up: connect, serve until lost, again (backing off on failures).

        Nothing but cancellation ends this task: without it the slot never reconnects.
        """
        failures = 0
        while True:
            try:
                link = await connect(self.target, self._connect_timeout, self._keepalive_interval)
            except Exception as error:  # OSError, asyncssh.Error, TimeoutError, HopError, ...
                self._last_error = str(error) or type(error).__name__
                failures += 1
                delay = _backoff(failures)
                log.warning(
                    "cannot reach %s:%d (%s); retrying in %.1f s",
                    self.target.host,
                    self.target.port,
                    self._last_error,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            lived = await self._serve(slot, link)
            # A connection that dies at once counts as a failure: no reconnect storm.
            failures = 0 if lived > STABLE_AFTER else failures + 1
            if failures:
                await asyncio.sleep(_backoff(failures))

    async def _serve(self, slot: int, link: Link) -> float:
        """Serve requests on `link` until it ends or retires; how long it lived."""
        self._links[slot] = link
        self._changed.set()
        started = time.monotonic()
        retired = asyncio.Event()
        self._retired[link] = (started, retired)
        run = asyncio.create_task(self._run(link))
        waiter = asyncio.create_task(retired.wait())
        try:
            await asyncio.wait((run, waiter), return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            self._links[slot] = None
            if retired.is_set():  # its agent restarts: it finishes its streams meanwhile
                self._draining.add(run)
                run.add_done_callback(self._draining.discard)
            else:
                run.cancel()
                await asyncio.gather(run, return_exceptions=True)
        if retired.is_set():
            log.info("the agent on %s is restarting: connecting to the next one", self.target.host)
            return STABLE_AFTER + 1  # at once, no back-off
        lived = time.monotonic() - started
        self._last_error = "the connection was lost; reconnecting"
        log.warning(
            "connection to %s:%d lost after %.1f s; reconnecting",
            self.target.host,
            self.target.port,
            lived,
        )
        return lived

    async def _run(self, link: Link) -> None:
        watch = asyncio.create_task(link.watch(*self._probe))  # half-open: closed, not waited on
        try:
            await link.run()
        except Exception:  # a bug in the frame pump: reconnect rather than go silent
            log.exception("hop connection to %s failed", self.target.host)
        finally:
            watch.cancel()
            self._retired.pop(link, None)
            await link.close()
            await asyncio.gather(watch, return_exceptions=True)

    def _retire(self, link: Link) -> None:
        """The agent behind `link` hands over: no new streams on it, nor on the links
        made before it (one login node, one agent); each slot connects anew."""
        since = self._retired.get(link, (0.0, None))[0]
        for other, (started, event) in list(self._retired.items()):
            if started <= since and not event.is_set():
                event.set()
                self._links = [None if k is other else k for k in self._links]

    def _pick(self) -> Link | None:
        if len(self._links) == 1:  # the usual case
            link = self._links[0]
            return link if link is not None and not link.channel.closed else None
        live = [k for k in self._links if k is not None and not k.channel.closed]
        return min(live, key=lambda k: len(k.channel.streams)) if live else None

    async def _link(self) -> Link:
        """The live connection with the fewest streams, waiting a bit for one to come up."""
        link = self._pick()  # the usual case: no timer needed
        if link is not None:
            return link
        try:
            async with asyncio.timeout(self._connect_timeout):
                while (link := self._pick()) is None:
                    self._changed.clear()
                    await self._changed.wait()
                return link
        except TimeoutError:
            message = f"no connection to {self.target.host}: {self._last_error}"
            raise HopUnavailable(message) from None

    # -- requests ---------------------------------------------------------------------
    def stream(
        self,
        service: str,
        method: str,
        path: str,
        headers: list[tuple[str, str]],
        body: bytes | AsyncIterable[bytes],
        *,
        first_byte_timeout: float,
        caller: wire.Caller | None = None,
        traceparent: str = "",
    ) -> HopStream:
        """`async with client.stream(...) as response`: one request stream; `caller` (who
        sent it, its class) and `traceparent` (the hub's span) go in the head, where only
        the hub can set them. `body`: bytes, or pieces that stream in (an upload), each sent
        as the agent's credit allows; the first byte is waited for once all are sent."""
        who = caller or wire.Caller()
        head = wire.RequestHead(service, method, path, list(headers), who, traceparent)
        return HopStream(self, head, body, first_byte_timeout)

    async def _exchange(
        self,
        link: Link,
        state: StreamState,
        head: wire.RequestHead,
        body: bytes | AsyncIterable[bytes],
        budget: asyncio.Timeout,
    ) -> HopResponse:
        channel = link.channel
        try:
            channel.send(wire.encode_request(state.id, head))
            if isinstance(body, bytes) and len(body) <= state.credit:  # the usual case
                await channel.send_data(state, body)
                channel.send(wire.encode_end(state.id))
            elif not await send_unless_answered(channel, state, body, budget):
                channel.send(wire.encode_end(state.id))
        except StreamClosed:
            raise HopLost("the connection to the login node was lost") from None
        except ValueError as error:  # head too large for a frame
            raise HopError(str(error), 400) from None
        item = await state.inbox.get()
        if isinstance(item, Lost):
            raise HopLost("the connection to the login node was lost before the response")
        if item.type == wire.ERROR:
            refusal = wire.parse_error(item.payload)
            raise HopError(refusal.message, refusal.status)
        if item.type != wire.RESPONSE:
            raise HopError(f"the agent answered with {wire.describe(item)}")
        parsed = wire.parse_response(item.payload)
        if parsed.status == 503 and any(name == RETIRING_HEADER for name, _ in parsed.headers):
            self._retire(link)
            raise HopLost("the agent is restarting")  # sent again on the new connection
        return HopResponse(parsed.status, parsed.headers, link, state)

    async def services(self) -> list[dict[str, Any]]:
        """The agent's live service state (id, name, status, demand, input, output, ...)."""
        try:
            return await self._services()
        except HopLost:  # a read: asked again on the new connection
            return await self._services()

    async def _services(self) -> list[dict[str, Any]]:
        path = "/saia/services"
        async with self.stream("", "GET", path, [], b"", first_byte_timeout=30) as response:
            body = b"".join([chunk async for chunk in response.aiter_bytes()])
        if response.status != 200:
            raise HopError(f"the agent answered {response.status} to {path}")
        try:
            data = json.loads(body)["data"]
        except (ValueError, KeyError, TypeError):
            raise HopError("the agent's service list is not valid JSON") from None
        if not isinstance(data, list):
            raise HopError("the agent's service list is not a list")
        return data


class HopStream:
    """The context of one request stream (a class: cheaper than asynccontextmanager).

    Leaving it before the response ended cancels the stream at the agent.
    """

    __slots__ = ("_body", "_client", "_head", "_link", "_response", "_state", "_timeout")

    def __init__(
        self,
        client: HopClient,
        head: wire.RequestHead,
        body: bytes | AsyncIterable[bytes],
        first_byte_timeout: float,
    ) -> None:
        self._client, self._head, self._body = client, head, body
        self._timeout = first_byte_timeout
        self._link: Link | None = None
        self._state: StreamState | None = None
        self._response: HopResponse | None = None

    async def __aenter__(self) -> HopResponse:
        link = self._link = await self._client._link()
        try:
            state = self._state = link.open_stream()
        except StreamClosed:  # nothing sent yet
            raise HopLost("the connection to the login node was lost") from None
        try:
            try:
                async with asyncio.timeout(self._timeout) as budget:
                    exchange = self._client._exchange(link, state, self._head, self._body, budget)
                    response = await exchange
            except TimeoutError:
                raise HopTimeout(f"no response within {self._timeout:.0f} s") from None
        except BaseException:
            self._end()
            raise
        self._response = response
        return response

    async def __aexit__(self, *exc_info: object) -> None:
        self._end()

    def _end(self) -> None:
        link, state, response = self._link, self._state, self._response
        if link is None or state is None:
            return
        self._state = None
        if response is None or not response.finished:
            link.channel.send(wire.encode_frame(wire.CANCEL, state.id))
        link.channel.discard(state)


def _backoff(failures: int) -> float:
    """Exponential, capped, with jitter so that many hubs do not reconnect in step."""
    delay: float = min(BACKOFF_MAX, BACKOFF_START * 2.0**failures)
    return delay * random.uniform(0.5, 1.0)
