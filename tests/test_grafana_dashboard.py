"""docs/grafana/saia.json (issue 15, part 5): valid dashboard JSON whose every query names
metrics the code exports: the hub's registry (hub/metrics.py) and the agent's text file
(hpc/scheduler/metrics_file.py), each made by the real code and read back."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from hpc.scheduler.metrics_file import render
from hpc.scheduler.status import AgentStatus, ServiceStatus
from hub.metrics import HubMetrics

DASHBOARD = Path(__file__).resolve().parents[1] / "docs" / "grafana" / "saia.json"
METRIC = re.compile(r"\bsaia_[a-z_]+\b")


def hub_samples() -> set[str]:
    metrics = HubMetrics()
    metrics.observe(
        model="m", upstream="u", endpoint="chat/completions", status=200, seconds=0.5,
        ttft=0.1, prompt_tokens=3, completion_tokens=4,
    )  # fmt: skip
    metrics.in_flight_of("m", "u").inc()
    metrics.rejected.labels("rate_limit").inc()
    text = metrics.exposition().decode()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def agent_samples() -> set[str]:
    service = ServiceStatus("s", "m", 1, 1, 0, 2, 3, 0.5, 1, 2, kv_cache_usage=0.3)
    status = AgentStatus("a", 1, 10.0, 5.0, services=[service])
    text = render(status).decode()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def queries(dashboard: dict[str, Any]) -> list[str]:
    out = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    return out + [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]


def test_every_panel_queries_metrics_the_hub_and_the_agent_export() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        if panel["type"] != "row":
            assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]
    exported = hub_samples() | agent_samples()
    named = {name for query in queries(dashboard) for name in METRIC.findall(query)}
    assert named and named <= exported, sorted(named - exported)
    # and every family exported is shown somewhere
    families = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in exported}
    families = {f for f in families if not f.endswith("_created")}  # client-side timestamps
    shown = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in named}
    assert families <= shown, sorted(families - shown)
