"""The agent's Prometheus metrics, as a text file for node_exporter's textfile collector.

A login node runs no service of ours that Prometheus could reach, and sites rarely let a
user process open a port there; node_exporter (often already on every node) reads `*.prom`
files from its `--collector.textfile.directory` and serves them with its own metrics. So
the agent rewrites `metrics_textfile` (atomically, 0644) from the same status snapshot as
`status.json`, after every loop. An agent that stopped leaves `saia_agent_up 0`; one that
died leaves its last file, which `saia_agent_status_timestamp_seconds` shows to be old.

Labels: service and model only (a job id would make a new series per job).
"""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, generate_latest

from hpc.jobs.system import write_atomic
from hpc.scheduler.status import AgentStatus, ServiceStatus

# name, help, the service's figure
SERVICE_GAUGES: list[tuple[str, str, str]] = [
    ("saia_agent_instances_ready", "Backends ready to serve", "ready"),
    ("saia_agent_instances_starting", "Jobs pending or not yet healthy", "starting"),
    ("saia_agent_instances_draining", "Backends being drained", "draining"),
    ("saia_agent_in_flight", "Requests being answered by backends", "in_flight"),
    ("saia_agent_queued", "Requests waiting in the router's queue", "queued"),
    ("saia_agent_oldest_wait_seconds", "Wait of the longest-waiting request", "oldest_wait_s"),
    ("saia_agent_request_rate", "Requests per second arriving (recent)", "rate_per_s"),
    ("saia_agent_backend_running", "Requests the backends report running", "running"),
    ("saia_agent_backend_waiting", "Requests the backends report waiting", "waiting"),
    ("saia_agent_load", "The scaling signal: max(in flight + queued, running + waiting)", "load"),
    ("saia_agent_min_instances", "Configured minimum instances", "min_instances"),
    ("saia_agent_max_instances", "Configured maximum instances", "max_instances"),
]


def render(status: AgentStatus) -> bytes:
    """The status as Prometheus text exposition."""
    registry = CollectorRegistry(auto_describe=True)
    labels = ("service", "model")
    up = Gauge("saia_agent_up", "1 while the agent runs, 0 once stopped", registry=registry)
    up.set(0 if status.stopped else 1)
    written = Gauge(
        "saia_agent_status_timestamp_seconds",
        "When the agent last wrote its status (stale: the agent hangs or died)",
        registry=registry,
    )
    written.set(status.written_at)
    error = Gauge("saia_agent_error", "1 when the agent reports an error", registry=registry)
    error.set(1 if status.error or status.reload_error else 0)
    gauges = [(Gauge(n, h, labels, registry=registry), field) for n, h, field in SERVICE_GAUGES]
    kv = Gauge(
        "saia_agent_kv_cache_usage",
        "Mean KV cache use of the backends, 0..1",
        labels,
        registry=registry,
    )
    for service in status.services:
        _service(service, gauges, kv)
    return generate_latest(registry)


def _service(service: ServiceStatus, gauges: list[tuple[Gauge, str]], kv: Gauge) -> None:
    names = (service.name, service.model_id)
    for gauge, field in gauges:
        gauge.labels(*names).set(float(getattr(service, field)))
    if service.kv_cache_usage is not None:
        kv.labels(*names).set(service.kv_cache_usage)


def write_metrics(path: Path | None, status: AgentStatus) -> None:
    """Rewrite the text file (nothing when not configured); node_exporter reads it as
    another user, hence 0644 (it holds no secret: counts per service)."""
    if path is not None:
        write_atomic(path, render(status).decode(), mode=0o644)
