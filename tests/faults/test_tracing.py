"""One trace per request across hub, hop and agent (issue 15, part 4), on the real chain.

The hub and the agent export to a local OTLP/HTTP collector process
(`saia.sandbox.otlp`); one streamed chat completion must arrive there as one trace: the
hub's request, auth, admission and upstream spans, and the agent's spans as children of
the hub's `hub.upstream` span (its traceparent went in the hop's request head). A client's
own `traceparent` header is not trusted: the trace is new.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from saia.sandbox.otlp import OtlpCollector, read_spans
from saia.sandbox.slurm import SlurmSandbox
from tests.faults.chain import FaultChain, running

SPAN_WAIT = 20.0  # the exporters send every 0.5 s
CLIENT_TRACEPARENT = "00-0123456789abcdef0123456789abcdef-0123456789abcdef-01"
PROMPT = "tell me a secret-free story"
HUB_SPANS = {
    "hub.request", "hub.auth", "hub.admission", "hub.upstream",
    "hub.upstream.connect", "hub.upstream.first_byte", "hub.upstream.stream",
}  # fmt: skip
AGENT_SPANS = {"agent.request", "agent.connect", "agent.first_byte", "agent.stream"}


@pytest.fixture(scope="module")
def collector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OtlpCollector]:
    with OtlpCollector(tmp_path_factory.mktemp("otlp") / "spans.jsonl") as running:
        yield running


@pytest.fixture(scope="module")
def traced_chain(
    collector: OtlpCollector,
    slurm_cluster: SlurmSandbox,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[FaultChain]:
    tracing = {"otlp_endpoint": collector.endpoint}
    extra = {"agent": {"tracing": tracing}, "hub": {"tracing": tracing}}
    root = tmp_path_factory.mktemp("chain")
    chain = FaultChain(root, slurm_cluster, [{"name": "traced"}], extra=extra)
    with running(chain):
        yield chain


def one_trace(out: Path, trace_id: str) -> list[dict[str, Any]]:
    """The spans of `trace_id` once hub and agent both exported theirs (bounded wait)."""
    deadline = time.monotonic() + SPAN_WAIT
    while True:
        spans = [s for s in read_spans(out) if s["trace_id"] == trace_id]
        if {s["name"] for s in spans} >= HUB_SPANS | AGENT_SPANS:
            return spans
        if time.monotonic() > deadline:
            names = sorted(s["name"] for s in spans)
            raise AssertionError(f"trace {trace_id} incomplete after {SPAN_WAIT:.0f} s: {names}")
        time.sleep(0.2)


def stream_one(chain: FaultChain) -> bytes:
    body = {
        "model": "traced",
        "stream": True,
        "max_tokens": 5,
        "messages": [{"role": "user", "content": PROMPT}],
    }
    headers = {"authorization": f"Bearer {chain.keys[0]}", "traceparent": CLIENT_TRACEPARENT}
    url = f"{chain.hub_url}/v1/chat/completions"
    with httpx.stream("POST", url, json=body, headers=headers, timeout=60) as response:
        assert response.status_code == 200
        return response.read()


def test_one_request_is_one_trace_through_hub_hop_and_agent(
    traced_chain: FaultChain, collector: OtlpCollector
) -> None:
    answer = stream_one(traced_chain)
    assert b"data: [DONE]" in answer
    roots = [s for s in read_spans(collector.out) if s["name"] == "hub.request"]
    deadline = time.monotonic() + SPAN_WAIT
    while not roots and time.monotonic() < deadline:
        time.sleep(0.2)
        roots = [s for s in read_spans(collector.out) if s["name"] == "hub.request"]
    assert len(roots) == 1, roots
    root = roots[0]
    assert root["trace_id"] != CLIENT_TRACEPARENT.split("-")[1]  # the client's is ignored
    assert root["parent_span_id"] == ""
    spans = one_trace(collector.out, root["trace_id"])
    by_name = {s["name"]: s for s in spans}
    upstream, agent = by_name["hub.upstream"], by_name["agent.request"]
    for name in HUB_SPANS - {"hub.request"}:
        parent = root if name in {"hub.auth", "hub.admission", "hub.upstream"} else upstream
        assert by_name[name]["parent_span_id"] == parent["span_id"], name
        assert by_name[name]["service"] == "saia-hub"
    assert agent["parent_span_id"] == upstream["span_id"]  # joined over the hop
    for name in AGENT_SPANS - {"agent.request"}:
        assert by_name[name]["parent_span_id"] == agent["span_id"], name
        assert by_name[name]["service"] == "saia-agent"
    assert agent["attributes"]["saia.service"] == "traced"
    assert root["attributes"]["http.response.status_code"] == 200
    assert by_name["agent.stream"]["attributes"]["saia.chunks"] > 0
    # The phases follow each other in time, and the agent's work lies within the hub's.
    assert upstream["start_ns"] <= agent["start_ns"] <= agent["end_ns"] <= upstream["end_ns"]
    first, stream = by_name["hub.upstream.first_byte"], by_name["hub.upstream.stream"]
    assert by_name["hub.upstream.connect"]["end_ns"] <= first["start_ns"] + 1_000_000
    assert first["end_ns"] <= stream["start_ns"] + 1_000_000
    text = json.dumps(spans)
    assert traced_chain.keys[0] not in text and PROMPT not in text  # no secrets in spans
    print_trace(spans)


def print_trace(spans: list[dict[str, Any]]) -> None:
    """The trace as an indented tree with durations (shown with -s)."""
    children: dict[str, list[dict[str, Any]]] = {}
    for span in spans:
        children.setdefault(span["parent_span_id"], []).append(span)
    start = min(s["start_ns"] for s in spans)

    def show(span: dict[str, Any], depth: int) -> None:
        offset, took = (span["start_ns"] - start) / 1e6, (span["end_ns"] - span["start_ns"]) / 1e6
        name = f"{'  ' * depth}{span['name']}"
        print(f"{name:<30} {span['service']:<11} +{offset:7.1f} ms {took:7.1f} ms")
        for child in sorted(children.get(span["span_id"], []), key=lambda s: s["start_ns"]):
            show(child, depth + 1)

    print(f"\ntrace {spans[0]['trace_id']}")
    for top in children.get("", []):
        show(top, 0)
