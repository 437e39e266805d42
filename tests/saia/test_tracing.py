"""The trace context on the hop: the traceparent field of the request head (issue 15)."""

from __future__ import annotations

import json

import pytest

from saia.base import protocol as wire
from saia.base.tracing import format_traceparent, parse_traceparent

PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def head_payload(**fields: object) -> bytes:
    body = {"service": "m", "method": "POST", "path": "/v1/chat/completions", "headers": []}
    return json.dumps(body | fields).encode()


def test_the_traceparent_crosses_the_hop_and_back_to_a_span_context() -> None:
    head = wire.RequestHead("m", "POST", "/v1/chat/completions", [], wire.Caller(), PARENT)
    frame = wire.FrameDecoder().feed(wire.encode_request(1, head))[0]
    parsed = wire.parse_request(frame.payload)
    assert parsed.traceparent == PARENT
    context = parse_traceparent(parsed.traceparent)
    assert context is not None and context.is_remote and context.trace_flags.sampled
    assert format_traceparent(context) == PARENT


def test_an_untraced_head_carries_no_field_and_parses_to_no_parent() -> None:
    head = wire.RequestHead("m", "POST", "/v1/chat/completions", [])
    assert b"traceparent" not in wire.encode_request(1, head)
    assert wire.parse_request(head_payload()).traceparent == ""
    assert parse_traceparent("") is None


@pytest.mark.parametrize(
    "value",
    [
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # unknown version
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper case
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",  # no flags
        PARENT + "\n",
        42,
    ],
)
def test_a_malformed_traceparent_is_a_protocol_error(value: object) -> None:
    with pytest.raises(wire.ProtocolError, match="traceparent"):
        wire.parse_request(head_payload(traceparent=value))


def test_an_all_zero_trace_id_is_no_parent() -> None:
    assert parse_traceparent("00-" + "0" * 32 + "-00f067aa0ba902b7-01") is None
