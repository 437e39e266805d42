"""The hub's spans of one proxied request (OpenTelemetry; off unless `tracing` is configured).

One trace per request: `hub.request` (from the request's arrival to its last byte) holds
`hub.auth`, `hub.admission` and `hub.upstream` (a CLIENT span from sending to the stream's
end), which holds `hub.upstream.connect` (until the response head), `hub.upstream.first_byte`
(head to first body chunk) and `hub.upstream.stream` (first chunk to end). The HPC upstream
sends `hub.upstream`'s traceparent in the hop's request head, so the agent's spans join the
trace. A client's own `traceparent` header is ignored: every request starts a new trace.

`start()` and `stop()` run outside the event loop (`saia hub serve` around uvicorn); `stop()`
flushes the exporter, which may block up to the export timeout. Off, every function returns
a shared no-op object. Attributes name the endpoint, model, upstream, status and sizes:
never a key, user or prompt.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractContextManager, AsyncExitStack
from typing import TYPE_CHECKING, Any

from hub.upstreams.base import UpstreamResponse
from saia.base.tracing import Tracing, format_traceparent

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

_NULL: AbstractContextManager[None] = contextlib.nullcontext()
_tracing = Tracing("saia-hub", "saia.hub")
start, stop = _tracing.start, _tracing.stop


def request_span(endpoint: str) -> AbstractContextManager[Any]:
    """The request's root span, current while the request is handled and answered."""
    tracer = _tracing.tracer
    if tracer is None:
        return _NULL
    from opentelemetry.trace import SpanKind

    attributes = {"http.request.method": "POST", "saia.endpoint": endpoint}
    return tracer.start_as_current_span("hub.request", kind=SpanKind.SERVER, attributes=attributes)


def phase(name: str) -> AbstractContextManager[Any]:
    """A child span of the current one around one phase (auth, admission)."""
    tracer = _tracing.tracer
    return _NULL if tracer is None else tracer.start_as_current_span(name)


def note_status(status: int) -> None:
    """The answer's status on the request's span (an error from 500 on)."""
    if _tracing.tracer is None:
        return
    from opentelemetry.trace import StatusCode, get_current_span

    span = get_current_span()
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(StatusCode.ERROR)


def traceparent() -> str:
    """The W3C traceparent of the current span, for the hop's request head ("" when off)."""
    if _tracing.tracer is None:
        return ""
    from opentelemetry.trace import get_current_span

    return format_traceparent(get_current_span().get_span_context())


class UpstreamTrace:
    """`hub.upstream` and its phases for one request; ended by the request's exit stack."""

    def __init__(self, tracer: Tracer, span: Span) -> None:
        self._tracer, self.span = tracer, span

    @contextlib.contextmanager
    def connect(self) -> Iterator[None]:
        """Around opening the upstream response: `hub.upstream` is the current span (the
        hop carries its traceparent) and `hub.upstream.connect` times the phase."""
        from opentelemetry.trace import StatusCode, set_span_in_context, use_span

        child = self._tracer.start_span(
            "hub.upstream.connect", context=set_span_in_context(self.span)
        )
        try:
            with use_span(self.span, end_on_exit=False):
                yield
        except BaseException as error:
            child.set_status(StatusCode.ERROR, type(error).__name__)
            raise
        finally:
            child.end()

    def body(self, response: UpstreamResponse) -> UpstreamResponse:
        self.span.set_attribute("http.response.status_code", response.status)
        return dataclasses.replace(response, chunks=self._chunks(response.chunks))

    async def _chunks(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        from opentelemetry.trace import set_span_in_context

        parent = set_span_in_context(self.span)
        phase = self._tracer.start_span("hub.upstream.first_byte", context=parent)
        count = size = 0
        try:
            async for chunk in chunks:
                if count == 0:
                    phase.end()
                    phase = self._tracer.start_span("hub.upstream.stream", context=parent)
                count, size = count + 1, size + len(chunk)
                yield chunk
        finally:
            phase.set_attributes({"saia.chunks": count, "saia.bytes": size})
            phase.end()


class _NoTrace:
    def connect(self) -> AbstractContextManager[None]:
        return _NULL

    def body(self, response: UpstreamResponse) -> UpstreamResponse:
        return response


_NO_TRACE = _NoTrace()


def upstream(stack: AsyncExitStack, model: str, upstream_name: str) -> UpstreamTrace | _NoTrace:
    """The upstream exchange's span, ended when `stack` closes (stream end or failure)."""
    tracer = _tracing.tracer
    if tracer is None:
        return _NO_TRACE
    from opentelemetry.trace import SpanKind

    attributes = {"saia.model": model, "saia.upstream": upstream_name}
    span = tracer.start_span("hub.upstream", kind=SpanKind.CLIENT, attributes=attributes)
    stack.callback(span.end)
    return UpstreamTrace(tracer, span)
