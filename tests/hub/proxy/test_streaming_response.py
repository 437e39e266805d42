"""UpstreamStreamingResponse behaves as Starlette's StreamingResponse does over HTTP (the
stream stops when the client disconnects, the background task runs after it), and owns the
request's exit stack until the stream has ended. Fast tests at the ASGI seam; the real-hub
test is test_proxy_faults.py::test_a_client_that_leaves_mid_stream_is_charged."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import AsyncExitStack
from typing import Any

import pytest
from starlette.background import BackgroundTask
from starlette.responses import StreamingResponse

from hub.proxy.answers import UpstreamStreamingResponse


class Probe:
    """What happened to one response: bodies sent, stack closed, generator closed,
    background run."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.events: list[str] = []
        self.go_away = asyncio.Event()

    async def content(self, endless: bool) -> AsyncGenerator[bytes, None]:
        try:
            yield b"data: 1\n\n"
            if endless:
                await asyncio.Event().wait()  # an upstream that keeps the stream open
            yield b"data: 2\n\n"
        finally:
            self.events.append("content closed")

    async def receive(self) -> dict[str, Any]:
        await self.go_away.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            self.sent.append(message["body"])
            self.go_away.set()  # the client leaves after the first chunk

    def response(self, cls: type[StreamingResponse], endless: bool) -> StreamingResponse:
        background = BackgroundTask(self.events.append, "background")
        content = self.content(endless)
        if cls is StreamingResponse:
            return StreamingResponse(content, background=background)
        stack = AsyncExitStack()
        stack.callback(self.events.append, "stack closed")
        response = UpstreamStreamingResponse(stack, content, 200, {})
        response.background = background
        return response


SCOPE = {"type": "http", "asgi": {"spec_version": "2.3"}}


@pytest.mark.parametrize("cls", [StreamingResponse, UpstreamStreamingResponse])
async def test_a_disconnect_ends_the_stream_and_the_background_task_runs(
    cls: type[StreamingResponse],
) -> None:
    probe = Probe()
    async with asyncio.timeout(5):  # an unnoticed disconnect would wait forever
        await probe.response(cls, endless=True)(SCOPE, probe.receive, probe.send)  # type: ignore[arg-type]
    assert probe.sent == [b"data: 1\n\n"]
    assert "background" in probe.events and "content closed" in probe.events
    if cls is UpstreamStreamingResponse:
        assert probe.events == ["content closed", "stack closed", "background"]


@pytest.mark.parametrize("cls", [StreamingResponse, UpstreamStreamingResponse])
async def test_a_whole_stream_then_the_background_task(cls: type[StreamingResponse]) -> None:
    probe = Probe()
    probe.go_away = asyncio.Event()  # the client stays

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            probe.sent.append(message["body"])

    await probe.response(cls, endless=False)(SCOPE, probe.receive, send)  # type: ignore[arg-type]
    assert b"".join(probe.sent) == b"data: 1\n\ndata: 2\n\n"
    assert probe.events[-1] == "background"


async def test_asgi_2_4_a_client_gone_is_an_oserror_from_send() -> None:
    probe = Probe()

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            raise OSError("client gone")

    scope = {"type": "http", "asgi": {"spec_version": "2.4"}}
    response = probe.response(UpstreamStreamingResponse, endless=True)
    async with asyncio.timeout(5):
        await response(scope, probe.receive, send)  # type: ignore[arg-type]
    assert probe.events == ["content closed", "stack closed", "background"]
