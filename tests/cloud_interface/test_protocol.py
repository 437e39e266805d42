"""The frame codec: round trips, validation, and arbitrary bytes never crash it."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from saia.base import protocol as p

payload_types = st.sampled_from([p.DATA, p.REQUEST, p.RESPONSE, p.ERROR, p.HELLO])


@st.composite
def frames(draw: st.DrawFn) -> p.Frame:
    kind = draw(st.sampled_from(sorted(p.TYPE_NAMES)))
    stream = 0 if kind in (p.HELLO, p.PING, p.PONG) else draw(st.integers(1, p.MAX_STREAM_ID))
    size = {p.END: 0, p.CANCEL: 0, p.WINDOW: 4, p.PING: 8, p.PONG: 8}.get(kind)
    payload = draw(st.binary(min_size=size or 0, max_size=size if size is not None else 600))
    return p.Frame(kind, stream, payload)


@given(st.lists(frames(), max_size=20), st.data())
def test_round_trip_at_any_split(items: list[p.Frame], data: st.DataObject) -> None:
    wire = b"".join(p.encode_frame(f.type, f.stream, f.payload) for f in items)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    decoder = p.FrameDecoder()
    got: list[p.Frame] = []
    start = 0
    for cut in [*cuts, len(wire)]:
        got += decoder.feed(wire[start:cut])
        start = cut
    assert got == items
    decoder.finish()


def test_byte_by_byte_gives_the_same_frames() -> None:
    items = [
        p.Frame(p.HELLO, 0, b'{"protocol":"saia-relay","version":1}'),
        p.Frame(p.DATA, 7, b"x" * 300),
        p.Frame(p.END, 7, b""),
        p.Frame(p.WINDOW, 7, p.WINDOW_BODY.pack(10)),
    ]
    wire = b"".join(p.encode_frame(f.type, f.stream, f.payload) for f in items)
    decoder = p.FrameDecoder()
    got = [frame for i in range(len(wire)) for frame in decoder.feed(wire[i : i + 1])]
    assert got == items


@given(st.binary(max_size=2000), st.integers(1, 64))
def test_garbage_raises_only_protocol_error(garbage: bytes, step: int) -> None:
    decoder = p.FrameDecoder()
    try:
        for i in range(0, len(garbage), step):
            for frame in decoder.feed(garbage[i : i + step]):
                parse_any(frame)
        decoder.finish()
    except p.ProtocolError:
        pass


def parse_any(frame: p.Frame) -> object:
    parsers = {
        p.HELLO: p.parse_hello,
        p.REQUEST: p.parse_request,
        p.RESPONSE: p.parse_response,
        p.ERROR: p.parse_error,
        p.WINDOW: p.parse_window,
    }
    parser = parsers.get(frame.type)
    return parser(frame.payload) if parser else frame.payload


@given(st.binary(max_size=300))
def test_heads_from_arbitrary_payloads_raise_only_protocol_error(payload: bytes) -> None:
    for kind in (p.HELLO, p.REQUEST, p.RESPONSE, p.ERROR):
        with contextlib.suppress(p.ProtocolError):
            parse_any(p.Frame(kind, 1, payload))


def test_oversized_frame_is_refused_from_its_header() -> None:
    header = p.HEADER.pack(p.DATA, 0, 1, p.MAX_DATA + 1)
    with pytest.raises(p.ProtocolError, match="exceeds"):
        p.FrameDecoder().feed(header)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (p.HEADER.pack(99, 0, 1, 0), "unknown frame type"),
        (p.HEADER.pack(p.DATA, 1, 1, 0), "flags"),
        (p.HEADER.pack(p.DATA, 0, 0, 0), "stream 0"),
        (p.HEADER.pack(p.PING, 0, 3, 8), "stream 3"),
        (p.HEADER.pack(p.WINDOW, 0, 3, 3), "must carry 4"),
        (p.HEADER.pack(p.REQUEST, 0, 1, p.MAX_HEAD + 1), "exceeds"),
    ],
)
def test_bad_headers(header: bytes, message: str) -> None:
    with pytest.raises(p.ProtocolError, match=message):
        p.FrameDecoder().feed(header)


def test_truncated_frame_is_reported_at_the_end() -> None:
    decoder = p.FrameDecoder()
    assert decoder.feed(p.encode_frame(p.DATA, 1, b"abcdef")[:-2]) == []
    assert decoder.pending == 14
    with pytest.raises(p.ProtocolError, match="inside a frame"):
        decoder.finish()


def test_request_head_round_trip_and_validation() -> None:
    head = p.RequestHead("m", "POST", "/v1/chat/completions", [("content-type", "a/b")])
    (frame,) = p.FrameDecoder().feed(p.encode_request(5, head))
    assert frame.stream == 5
    assert p.parse_request(frame.payload) == head
    for bad in (
        b'{"service":"m","method":"post","path":"/"}',
        b'{"service":"m","method":"GET","path":"/\\r\\nHost: x"}',
        b'{"service":1,"method":"GET","path":"/"}',
        b'{"service":"m","method":"GET","path":"/","headers":[["a"]]}',
        b"[]",
        b"\xff",
    ):
        with pytest.raises(p.ProtocolError):
            p.parse_request(bad)


def test_response_error_window_hello() -> None:
    head = p.ResponseHead(503, [("retry-after", "5")])
    (frame,) = p.FrameDecoder().feed(p.encode_response(3, head))
    assert p.parse_response(frame.payload) == head
    (frame,) = p.FrameDecoder().feed(p.encode_error(3, 413, "too_large", "body too large"))
    assert p.parse_error(frame.payload) == p.ErrorBody(413, "too_large", "body too large")
    (frame,) = p.FrameDecoder().feed(p.encode_window(3, 4096))
    assert p.parse_window(frame.payload) == 4096
    (frame,) = p.FrameDecoder().feed(p.encode_hello())
    assert p.parse_hello(frame.payload) == p.VERSION
    with pytest.raises(p.ProtocolError):
        p.parse_window(p.WINDOW_BODY.pack(0))
    with pytest.raises(p.ProtocolError):
        p.parse_hello(b'{"protocol":"other","version":1}')


def test_encoder_refuses_what_the_decoder_would_refuse() -> None:
    with pytest.raises(ValueError):
        p.encode_frame(p.DATA, 1, b"x" * (p.MAX_DATA + 1))
    with pytest.raises(ValueError):
        p.encode_frame(p.END, 1, b"x")
