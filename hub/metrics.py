"""Prometheus metrics of the hub, in its own registry.

Labels are model, upstream, endpoint and status class only: never a key, user or group,
which would leak identities and explode the series count.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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
        self.requests.labels(*labels).inc()
        self.latency.labels(*labels).observe(seconds)
        if ttft is not None:
            self.ttft.labels(model, upstream).observe(ttft)
        if prompt_tokens:
            self.tokens.labels(model, upstream, "prompt").inc(prompt_tokens)
        if completion_tokens:
            self.tokens.labels(model, upstream, "completion").inc(completion_tokens)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
