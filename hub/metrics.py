"""Prometheus metrics of the hub, in its own registry.

Labels are model, upstream, endpoint and status class only: never a key, user or group,
which would leak identities and explode the series count. Each labelled child is looked up
once and kept (`labels()` validates and locks on every call); the label values come from
the configuration, so the cache stays small.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status < 600 else "other"


class HubMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ("model", "upstream", "endpoint", "status")
        self.requests = Counter(
            "saia_hub_requests", "Requests answered", labels, registry=self.registry
        )
        self.latency = Histogram(
            "saia_hub_request_seconds",
            "Time from request to last byte",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "saia_hub_time_to_first_token_seconds",
            "Time from request to the first streamed chunk",
            ("model", "upstream"),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "saia_hub_tokens",
            "Tokens reported by upstreams",
            ("model", "upstream", "kind"),
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "saia_hub_in_flight",
            "Requests in progress",
            ("model", "upstream"),
            registry=self.registry,
        )
        self.rejected = Counter(
            "saia_hub_rejected",
            "Requests refused before any upstream",
            ("reason",),
            registry=self.registry,
        )
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def _child(self, metric: MetricWrapperBase, *labels: str) -> Any:
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def in_flight_of(self, model: str, upstream: str) -> Gauge:
        """The in-flight gauge of a model at an upstream."""
        gauge: Gauge = self._child(self.in_flight, model, upstream)
        return gauge

    def observe(
        self,
        *,
        model: str,
        upstream: str,
        endpoint: str,
        status: int,
        seconds: float,
        ttft: float | None,
        prompt_tokens: int,
        completion_tokens: int,
    ) -> None:
        labels = (model, upstream, endpoint, status_class(status))
        self._child(self.requests, *labels).inc()
        self._child(self.latency, *labels).observe(seconds)
        if ttft is not None:
            self._child(self.ttft, model, upstream).observe(ttft)
        if prompt_tokens:
            self._child(self.tokens, model, upstream, "prompt").inc(prompt_tokens)
        if completion_tokens:
            self._child(self.tokens, model, upstream, "completion").inc(completion_tokens)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
