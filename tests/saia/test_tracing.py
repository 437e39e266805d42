"""The trace context on the hop: the traceparent field of the request head (issue 15); the
one tracer setup (`saia.base.tracing.Tracing`) both sides start and stop."""

from __future__ import annotations

import json

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from hpc.router import tracing as agent_tracing
from hub.upstreams import tracing as hub_tracing
from saia.base import protocol as wire
from saia.base.tracing import Tracing, TracingConfig, format_traceparent, parse_traceparent
from tests.hpc.router.test_router_waits import Sink

PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
# Never contacted: the spans go to the in-memory processor each test passes.
CONFIG = TracingConfig(otlp_endpoint="http://127.0.0.1:9/v1/traces")


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


def test_a_side_traces_between_start_and_stop_only() -> None:
    exporter = InMemorySpanExporter()
    side = Tracing("saia-test", "saia.test")
    side.start(None)  # no tracing section: off
    assert side.tracer is None
    side.start(CONFIG, SimpleSpanProcessor(exporter))
    assert side.tracer is not None
    side.tracer.start_span("one").end()
    side.stop()
    assert side.tracer is None
    side.stop()  # a second stop is harmless
    (span,) = exporter.get_finished_spans()
    assert span.name == "one" and span.resource.attributes["service.name"] == "saia-test"


def test_the_agents_request_span_is_a_child_of_the_hubs_span() -> None:
    exporter = InMemorySpanExporter()
    hub_tracing.start(CONFIG, SimpleSpanProcessor(exporter))
    agent_tracing.start(CONFIG, SimpleSpanProcessor(exporter))
    try:
        with hub_tracing.request_span("chat/completions"):
            parent = hub_tracing.traceparent()
        head = wire.RequestHead("m", "POST", "/v1/chat/completions", [], wire.Caller(), parent)
        sink = Sink()
        with agent_tracing.request(head, sink) as traced:
            traced.start(200, [])
            traced.finish()
    finally:
        hub_tracing.stop()
        agent_tracing.stop()
    assert sink.status == 200 and sink.finished
    spans = {span.name: span for span in exporter.get_finished_spans()}
    hub, agent = spans["hub.request"], spans["agent.request"]
    assert agent.parent is not None and agent.parent.span_id == hub.context.span_id
    assert agent.context.trace_id == hub.context.trace_id
    assert hub.resource.attributes["service.name"] == "saia-hub"
    assert agent.resource.attributes["service.name"] == "saia-agent"
    assert hub_tracing.traceparent() == ""  # stopped: off again
