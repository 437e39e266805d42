"""OpenTelemetry tracing that hub and agent share: the config section, the tracer
provider with its OTLP exporter, and the W3C traceparent carried in the hop's request head.

Tracing is off unless a config names an OTLP endpoint. Off, nothing here is imported from
OpenTelemetry (the imports live inside the functions) and each side's tracing module
answers with shared no-op objects, so a request pays a few attribute lookups.

The exporter runs in the SDK's BatchSpanProcessor, which owns a thread of its own: ending a
span only appends it to an in-memory queue, and the thread sends batches over HTTP. That
thread is the SDK's design and the one exception to the no-threads rule; the queue is
bounded (spans beyond it are dropped, never waited for).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Annotated

from pydantic import Field

from saia.base.config_file import Duration, Strict

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.trace import SpanContext, Tracer

log = logging.getLogger(__name__)

MAX_QUEUE = 2048  # spans waiting for export; more are dropped


class TracingConfig(Strict):
    """OpenTelemetry tracing (off when this section is absent)."""

    otlp_endpoint: str
    """OTLP/HTTP traces URL of a collector, e.g. http://127.0.0.1:4318/v1/traces."""
    service_name: str = ""
    """service.name of the spans; empty: saia-hub or saia-agent."""
    sample_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0
    """Fraction of new traces kept (the agent follows the hub's decision per request)."""
    export_timeout: Duration = 5.0
    """Limit of one export call (and of the flush when the process stops)."""


def make_provider(
    config: TracingConfig, default_name: str, processor: SpanProcessor | None = None
) -> TracerProvider:
    """A tracer provider exporting to `config.otlp_endpoint` (or to `processor`, in tests).

    The provider is kept by the caller, not installed globally: a process may run more than
    one (tests), and no library's spans leak into ours.
    """
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    resource = Resource.create({"service.name": config.service_name or default_name})
    sampler = ParentBased(TraceIdRatioBased(config.sample_ratio))
    provider = TracerProvider(resource=resource, sampler=sampler)
    provider.add_span_processor(processor or _otlp_processor(config))
    log.info("tracing to %s as %s", config.otlp_endpoint, config.service_name or default_name)
    return provider


class Tracing:
    """One side's tracer (hub or agent): None until `start` and again after `stop`.

    `start()` and `stop()` run outside the event loop (around asyncio.run or uvicorn):
    `stop()` flushes the exporter, which may block up to the export timeout.
    """

    def __init__(self, default_name: str, tracer_name: str) -> None:
        self._default_name, self._tracer_name = default_name, tracer_name
        self._provider: TracerProvider | None = None
        self.tracer: Tracer | None = None

    def start(self, config: TracingConfig | None, processor: SpanProcessor | None = None) -> None:
        """Trace from now on if `config` says so (`processor`: where spans go, in tests)."""
        if config is None:
            return
        self._provider = make_provider(config, self._default_name, processor)
        self.tracer = self._provider.get_tracer(self._tracer_name)

    def stop(self) -> None:
        """Export what is queued (bounded by the export timeout) and trace no more."""
        provider, self._provider, self.tracer = self._provider, None, None
        if provider is not None:
            provider.shutdown()


def _otlp_processor(config: TracingConfig) -> SpanProcessor:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    exporter = OTLPSpanExporter(endpoint=config.otlp_endpoint, timeout=config.export_timeout)
    timeout_ms = int(config.export_timeout * 1000)
    return BatchSpanProcessor(
        exporter,
        max_queue_size=MAX_QUEUE,
        schedule_delay_millis=500,
        export_timeout_millis=timeout_ms,
    )


def format_traceparent(context: SpanContext) -> str:
    """The W3C traceparent of a span ("" for an invalid one)."""
    if not context.is_valid:
        return ""
    flags = int(context.trace_flags) & 0xFF
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{flags:02x}"


def parse_traceparent(text: str) -> SpanContext | None:
    """The remote parent named by a traceparent the protocol already checked (or None)."""
    from opentelemetry.trace import SpanContext, TraceFlags

    if not text:
        return None
    _version, trace_id, span_id, flags = text.split("-")
    context = SpanContext(
        int(trace_id, 16), int(span_id, 16), is_remote=True, trace_flags=TraceFlags(int(flags, 16))
    )
    return context if context.is_valid else None
