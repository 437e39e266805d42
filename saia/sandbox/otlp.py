"""A local OTLP/HTTP trace collector for tests and the demo: spans in, JSON lines out.

`python -m saia.sandbox.otlp --port PORT --out FILE` accepts `POST /v1/traces`
(protobuf ExportTraceServiceRequest, as the OTLP/HTTP exporter sends it) on 127.0.0.1 and
appends one JSON object per span to FILE: service, name, trace_id, span_id,
parent_span_id, kind, start_ns, end_ns, attributes. `OtlpCollector(out).start()` runs it as
a process, stopped by pid. It stands in for an OpenTelemetry Collector, which has no
Debian or PyPI package to install here.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import httpx

from saia.sandbox.process import Sandbox, SandboxError, free_port, stop_process

START_LIMIT = 15.0


def spans_of(body: bytes) -> list[dict[str, Any]]:
    """The spans of one ExportTraceServiceRequest, as plain dicts."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    request = ExportTraceServiceRequest.FromString(body)
    out = []
    for resource_spans in request.resource_spans:
        resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                attributes = {a.key: _value(a.value) for a in span.attributes}
                out.append(
                    {
                        "service": resource.get("service.name", ""),
                        "name": span.name,
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex(),
                        "kind": int(span.kind),
                        "start_ns": span.start_time_unix_nano,
                        "end_ns": span.end_time_unix_nano,
                        "status": int(span.status.code),
                        "attributes": attributes,
                    }
                )
    return out


def _value(value: Any) -> Any:
    """A scalar AnyValue as its Python value (None for arrays and maps)."""
    kind = value.WhichOneof("value")
    return (
        getattr(value, kind)
        if kind in ("string_value", "int_value", "bool_value", "double_value")
        else None
    )


def _handler(out: Path) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", "0"))
            body = self.rfile.read(length)
            if self.path != "/v1/traces":
                self.send_error(404)
                return
            with out.open("a", encoding="utf-8") as file:
                for span in spans_of(body):
                    file.write(json.dumps(span) + "\n")
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", "0")
            self.end_headers()

        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/health" else 404)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            return None  # quiet: the spans file is the record

    return Handler


def read_spans(out: Path) -> list[dict[str, Any]]:
    """The spans collected so far."""
    if not out.exists():
        return []
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines() if line]


class OtlpCollector(Sandbox):
    """The collector as a process on a free loopback port; `endpoint` is its traces URL."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}/v1/traces"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> OtlpCollector:
        argv = [sys.executable, "-m", "saia.sandbox.otlp", "--port", str(self.port)]
        self.process = subprocess.Popen(
            [*argv, "--out", str(self.out)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
        )
        deadline = time.monotonic() + START_LIMIT
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise SandboxError(f"the OTLP collector did not listen on {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, 5.0)
            self.process = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    server = HTTPServer(("127.0.0.1", args.port), _handler(args.out))
    server.serve_forever()


if __name__ == "__main__":
    main()
