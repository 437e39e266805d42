"""Random interleavings of frames on upload streams (the audio endpoints, whose bodies the
router streams into the backend as they arrive) beside buffered ones, from a hub that may
break the rules (Hypothesis): the session stays within its budget after every frame, every
request is answered or the channel closed with a ProtocolError, nothing fails inside the
agent, and when the connection ends every upload's request has ended and released what
it held.

The forwarder is replaced at its seam by one that drains an upload piece by piece (with a
pause now and then, as a backend reading slowly) and answers the bytes it got.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, cast
from unittest import mock

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hpc.config import AgentConfig, RouterConfig, ServiceConfig
from hpc.registry import BackendRegistry
from hpc.router import server
from hpc.router.forwarding import Forwarder
from hpc.router.server import Router
from hpc.router.session import StreamSink
from hpc.router.upload import Upload
from saia.base import protocol as wire
from tests.hpc.router.test_router_frames import PROBE, Errors, settle
from tests.hpc.router.test_router_hostile import MODEL, Recording, connect, data, request

AUDIO = "/v1/audio/transcriptions"
MAX_BODY = 64 * 1024
BUDGET = 4 * MAX_BODY
ids = st.integers(0, 8)
sizes = st.sampled_from([1, 700, 20_000, 60_000, wire.MAX_DATA])
ops = st.one_of(
    st.tuples(st.just("request"), st.sampled_from(["audio", "audio", "chat"])),
    st.tuples(st.just("data"), ids, sizes),
    st.tuples(st.just("data"), ids, sizes),
    st.tuples(st.just("end"), ids),
    st.tuples(st.just("cancel"), ids),
    st.tuples(st.just("reuse"), ids),  # a REQUEST on an id in use: a ProtocolError
)


class DrainingForwarder:
    """At the forwarder's seam: drains an upload (pausing every third piece) and answers
    200 with the bytes it got; a buffered body, its size."""

    async def forward(
        self, sink: StreamSink, service: Any, head: wire.RequestHead, body: bytes | Upload
    ) -> None:
        size = 0
        if isinstance(body, Upload):
            async for piece in body.pieces():
                size += len(piece)
                if size % 3 == 0:
                    await asyncio.sleep(0.001)
        else:
            size = len(body)
        await sink.reply(200, b'{"bytes": %d}' % size, [])


def encode(sequence: list[tuple[Any, ...]]) -> bytes:
    opened: list[int] = []
    out = []
    for name, *args in sequence:
        if name == "request":
            stream = (opened[-1] if opened else 0) + 1
            opened.append(stream)
            out.append(request(stream, AUDIO if args[0] == "audio" else "/v1/chat/completions"))
            continue
        if not opened:
            continue
        stream = opened[args[0] % len(opened)]
        if name == "data":
            out.append(data(stream, args[1]))
        elif name == "end":
            out.append(wire.encode_end(stream))
        elif name == "cancel":
            out.append(wire.encode_frame(wire.CANCEL, stream))
        else:
            out.append(request(stream, AUDIO))
    return b"".join(out)


async def scenario(sequence: list[tuple[Any, ...]], tmp_path: Path) -> None:
    Recording.made, Recording.peak_held = [], 0
    service = ServiceConfig(name=MODEL, model=MODEL, endpoints=["transcriptions", "chat"])
    config = AgentConfig(
        state_dir=tmp_path, services=[service], router=RouterConfig(max_body_bytes=MAX_BODY)
    )
    forwarder = cast(Forwarder, DrainingForwarder())
    router = Router(lambda: config, BackendRegistry(), forwarder)
    router.max_streams, router.min_budget = 8, 0
    async with connect(router) as hub:
        probe = wire.encode_request(PROBE, wire.RequestHead("", "GET", "/v1/models", []))
        hub.send(encode(sequence) + probe + wire.encode_end(PROBE))
        await settle(hub, 20)
        hub.writer.close()
        async with asyncio.timeout(20):
            await asyncio.gather(hub.task, return_exceptions=True)
        assert hub.task.exception() is None  # a bound check or a crash would be here
    [kept] = Recording.made
    # Every request's task ended; what is still counted is exactly what the streams left
    # hold (bodies that never got their END, streams whose task was cancelled before it
    # ran: dropped with the session).
    tables = (kept.incoming, kept.uploads, kept.answering)
    left = list({id(i): i for table in tables for i in table.values()}.values())
    assert all(i.state.task is None or i.state.task.done() for i in left)
    assert kept.held == sum(incoming.cost for incoming in left), sequence


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ops, max_size=30))
@example([("request", "audio")] * 4 + [("data", i % 4, wire.MAX_DATA) for i in range(16)])
@example([("request", "audio"), ("data", 0, 60_000), ("cancel", 0), ("data", 0, 700)])
def test_any_upload_frames_are_answered_or_refused_within_the_budget(
    sequence: list[tuple[Any, ...]],
) -> None:
    errors = Errors()
    logger = logging.getLogger("hpc.router")
    logger.addHandler(errors)
    try:
        with mock.patch.object(server, "Session", Recording):
            asyncio.run(scenario(sequence, Path("/nonexistent")))
    finally:
        logger.removeHandler(errors)
    assert errors.records == []  # no request failed inside the agent
    assert Recording.peak_held <= BUDGET


async def test_a_stream_cancelled_with_its_end_releases_what_it_held(tmp_path: Path) -> None:
    """END and CANCEL in one read (a client that leaves just after sending): the stream's
    task is cancelled before it ever ran, so its own cleanup never runs; what the stream
    held is released anyway (it stayed charged to the connection's budget for ever)."""
    service = ServiceConfig(name=MODEL, model=MODEL, endpoints=["transcriptions", "chat"])
    config = AgentConfig(
        state_dir=tmp_path, services=[service], router=RouterConfig(max_body_bytes=MAX_BODY)
    )
    router = Router(lambda: config, BackendRegistry(), cast(Forwarder, DrainingForwarder()))
    router.min_budget = 0
    cancel = wire.encode_frame(wire.CANCEL, 1), wire.encode_frame(wire.CANCEL, 2)
    frames = [
        request(1, "/v1/chat/completions") + data(1, 5000) + wire.encode_end(1) + cancel[0],
        request(2, AUDIO) + data(2, 5000) + wire.encode_end(2) + cancel[1],
    ]
    with mock.patch.object(server, "Session", Recording):
        Recording.made = []
        async with connect(router) as hub:
            hub.send(b"".join(frames) + request(3) + data(3, 10) + wire.encode_end(3))
            async with asyncio.timeout(20):
                while not hub.answer(3):  # noqa: ASYNC110 (frames arrive in a task)
                    await asyncio.sleep(0.01)
            [kept] = Recording.made
            assert kept.held == 0 and not kept.channel.streams
