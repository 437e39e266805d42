"""Random interleavings of valid and invalid frames from a hub, fed into the agent's router
session (Hypothesis): its memory stays within the budget, it either answers or closes the
channel with a ProtocolError (never hangs or crashes), and a well-behaved stream on another
connection of the same router is unaffected."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any
from unittest import mock

from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from hpc.router import server
from saia.base import protocol as wire
from tests.hpc.router.test_router_hostile import Hub, Recording, connect, data, make_router, request

PROBE = 1_000_000  # a stream id above every id the examples use
BUDGET = 128 * 1024  # bytes of heads and bodies a connection may hold (4 x max_body_bytes)
ids = st.integers(0, 12)  # for REQUEST: the step to the new id (0 reuses one: invalid)
kinds = st.sampled_from([0, wire.HELLO, wire.RESPONSE, wire.ERROR, wire.WINDOW, wire.PONG, 11])
heads = st.sampled_from(["chat", "chat", "models", "not json", "bad head", "nowhere", "huge"])
sizes = st.sampled_from([0, 1, 700, 5000, 12_000, 20_000, 30_000, wire.MAX_DATA])
valid = st.one_of(
    st.tuples(st.just("request"), st.integers(1, 3), heads),
    st.tuples(st.just("data"), ids, sizes),
    st.tuples(st.just("data"), ids, sizes),
    st.tuples(st.just("end"), ids),
    st.tuples(st.just("cancel"), ids),
    st.tuples(st.just("ping"), st.integers(1, 5000)),
)
invalid = st.one_of(
    st.tuples(st.just("request"), ids, heads),
    st.tuples(st.just("frame"), kinds, st.integers(0, 3), st.binary(max_size=12)),
    st.tuples(st.just("garbage"), st.binary(min_size=1, max_size=24)),
)
ops = st.one_of(*[valid] * 15, invalid)


def head_frame(stream: int, kind: str) -> bytes:
    if kind == "not json":
        return wire.encode_frame(wire.REQUEST, stream, b"{not json")
    if kind == "bad head":
        return wire.encode_frame(wire.REQUEST, stream, b'{"service": 5, "method": "get"}')
    if kind == "huge":
        return request(stream, headers=[(f"x-{i}", "v" * 400) for i in range(80)])
    path = {"chat": "/v1/chat/completions", "models": "/v1/models"}.get(kind, "/nowhere")
    return request(stream, path)


def encode(sequence: list[tuple[Any, ...]]) -> bytes:
    """The frames of `sequence`; DATA, END and CANCEL go to streams opened before."""
    opened = [0]
    out = []
    for name, *args in sequence:
        targets = opened[1:]
        if name in ("data", "end", "cancel") and not targets:
            continue  # nothing opened yet: such frames only test one rule, again and again
        stream = targets[args[0] % len(targets)] if name in ("data", "end", "cancel") else 0
        if name == "request":
            stream = opened[-1] + args[0] if args[0] else opened[args[0] % len(opened)]
            opened.append(stream)
            out.append(head_frame(stream, args[1]))
        elif name == "data":
            out.append(data(stream, args[1]) if args[1] else wire.encode_data(stream, b""))
        elif name == "end":
            out.append(wire.encode_end(stream))
        elif name == "cancel":
            out.append(wire.encode_frame(wire.CANCEL, stream))
        elif name == "ping":
            out.append(wire.encode_frame(wire.PING, 0, b"12345678") * args[0])
        elif name == "frame":
            kind, target, payload = args
            out.append(wire.HEADER.pack(kind, 0, target, len(payload)) + payload)
        else:
            out.append(bytes(args[0]))
    return b"".join(out)


def truncated(stream: bytes) -> bool:
    """Whether the bytes end inside a frame (the agent can only tell at EOF)."""
    decoder = wire.FrameDecoder()
    try:
        decoder.feed(stream)
    except wire.ProtocolError:
        return False
    return decoder.pending > 0


async def settle(hub: Hub, limit: float) -> None:
    """Until the probe is answered or the channel closed (bounded)."""
    async with asyncio.timeout(limit):
        while not (hub.closed or hub.answer(PROBE)):  # noqa: ASYNC110 (frames arrive in a task)
            await asyncio.sleep(0.01)


async def scenario(sequence: list[tuple[Any, ...]]) -> None:
    Recording.made, Recording.peak_held, Recording.peak_streams = [], 0, 0
    router = make_router(Path("/nonexistent"), streams=8, budget=0, max_body=BUDGET // 4)
    async with connect(router) as hostile, connect(router) as good:
        sent = encode(sequence)
        probe = wire.encode_request(PROBE, wire.RequestHead("", "GET", "/v1/models", []))
        hostile.send(sent + probe + wire.encode_end(PROBE))
        good.send(request(1) + data(1, 1000) + wire.encode_end(1))
        if truncated(sent + probe + wire.encode_end(PROBE)):
            hostile.writer.write_eof()  # the frame it began never ends
        await settle(hostile, 20)
        await settle_good(good)
        assert good.answer(1) == (200, {"bytes": 1000})
        event("answered" if hostile.answer(PROBE) else "closed")
        event(f"peak held > half the budget: {Recording.peak_held > BUDGET // 2}")
        if not hostile.answer(PROBE):  # then it closed, saying why on stream 0 ...
            assert hostile.closed
            for error in hostile.frames.get(0, []):  # ... unless a reset discarded it
                assert error.type == wire.ERROR
                assert wire.parse_error(error.payload).code == "protocol_error"
        hostile.writer.close()
        async with asyncio.timeout(20):
            await asyncio.gather(hostile.task, return_exceptions=True)
        assert hostile.task.exception() is None  # a bound check or a crash would be here


async def settle_good(hub: Hub) -> None:
    async with asyncio.timeout(20):
        while not hub.answer(1):  # noqa: ASYNC110 (frames arrive in a task)
            await asyncio.sleep(0.01)


class Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ops, max_size=40))
@example([op for i in range(8) for op in (("request", 1, "chat"), ("data", i, 30_000))])
@example([("request", 1, "huge")] * 9 + [("ping", 5000)] * 20 + [("end", 8)])
def test_any_frame_sequence_is_answered_or_refused_within_the_budget(
    sequence: list[tuple[Any, ...]],
) -> None:
    errors = Errors()
    logger = logging.getLogger("hpc.router")
    logger.addHandler(errors)
    try:
        with mock.patch.object(server, "Session", Recording):
            asyncio.run(scenario(sequence))
    finally:
        logger.removeHandler(errors)
    assert errors.records == []  # no request failed inside the agent
    assert Recording.peak_held <= BUDGET
