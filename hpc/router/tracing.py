"""The agent's spans of one forwarded request (OpenTelemetry; off unless `tracing` is set).

`agent.request` (SERVER) is the child of the hub's `hub.upstream` span named by the
traceparent in the hop's request head: the hub alone writes that field, and the hop is the
agent's only way in, so it is trusted there (never from a request's HTTP headers). Under it:
`agent.connect` (queue wait for a slot, backend connect and response head),
`agent.first_byte` (head to first body chunk) and `agent.stream` (to the stream's end). A
request the hub did not sample is not sampled here either. The phases are read off the
response sink the forwarder writes to, so forwarding itself needs no change.

`start()` and `stop()` run outside the event loop (`saia hpc agent` around asyncio.run);
`stop()` flushes the exporter, bounded by its export timeout. Off, `request()` hands back
the sink itself. Attributes: service, method, path, status and sizes; never a key or body.
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING

from hpc.router.forwarding import Rejection, ResponseSink
from saia.base.protocol import RequestHead
from saia.base.tracing import Tracing, parse_traceparent

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer

_tracing = Tracing("saia-agent", "saia.agent")
start, stop = _tracing.start, _tracing.stop


class _Untraced:
    __slots__ = ("_sink",)

    def __init__(self, sink: ResponseSink) -> None:
        self._sink = sink

    def __enter__(self) -> ResponseSink:
        return self._sink

    def __exit__(self, *exc: object) -> None:
        return None


def request(head: RequestHead, sink: ResponseSink) -> _Untraced | TracedRequest:
    """`with request(head, sink) as sink:` around forwarding one request."""
    tracer = _tracing.tracer
    if tracer is None:
        return _Untraced(sink)
    return TracedRequest(tracer, head, sink)


def _parent(head: RequestHead) -> Context | None:
    from opentelemetry.trace import NonRecordingSpan, set_span_in_context

    remote = parse_traceparent(head.traceparent)
    return None if remote is None else set_span_in_context(NonRecordingSpan(remote))


class TracedRequest:
    """The request's span and a sink that times the answer's phases as they pass."""

    def __init__(self, tracer: Tracer, head: RequestHead, sink: ResponseSink) -> None:
        from opentelemetry.trace import SpanKind, set_span_in_context

        attributes = {
            "saia.service": head.service,
            "http.request.method": head.method,
            "url.path": head.path,
        }
        self._tracer, self._sink = tracer, sink
        self.span = tracer.start_span(
            "agent.request", context=_parent(head), kind=SpanKind.SERVER, attributes=attributes
        )
        self._context = set_span_in_context(self.span)
        self._phase: Span = tracer.start_span("agent.connect", context=self._context)
        self._first = True
        self._chunks = self._bytes = 0

    def __enter__(self) -> TracedRequest:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        from opentelemetry.trace import StatusCode

        if error is not None:
            status = error.status if isinstance(error, Rejection) else None
            if status is not None:
                self.span.set_attribute("http.response.status_code", status)
            self.span.set_status(StatusCode.ERROR, type(error).__name__)
        self._phase.set_attributes({"saia.chunks": self._chunks, "saia.bytes": self._bytes})
        self._phase.end()
        self.span.end()

    def _next_phase(self, name: str) -> None:
        self._phase.end()
        self._phase = self._tracer.start_span(name, context=self._context)

    # -- the ResponseSink the forwarder writes to -----------------------------------------
    def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        self.span.set_attribute("http.response.status_code", status)
        self._next_phase("agent.first_byte")
        self._sink.start(status, headers)

    async def send(self, data: bytes) -> None:
        if self._first:
            self._first = False
            self._next_phase("agent.stream")
        self._chunks, self._bytes = self._chunks + 1, self._bytes + len(data)
        await self._sink.send(data)

    def finish(self) -> None:
        self._sink.finish()

    def fail(self, status: int, code: str, message: str) -> None:
        from opentelemetry.trace import StatusCode

        self.span.set_status(StatusCode.ERROR, code)
        self._sink.fail(status, code, message)
