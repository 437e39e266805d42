"""The hub's own CPU time per proxied request, without sockets: the ASGI app called directly,
the upstream replaced at the `Upstream` seam by canned answers (a JSON chat completion, or a
16-token event stream with a usage chunk), SQLite accounting as in production.

    .venv/bin/python bench/hub_cpu.py [--requests 1000] [--rounds 7] [--tracing]

--tracing measures each kind twice in the same run: tracing off (the default), then on
(every request sampled, spans exported over OTLP/HTTP to a local collector process, the
exporter's thread counted in the process CPU time).

Process CPU time, so it hardly moves with other load on the machine (bench/hub.py measures
the whole path over HTTP, which does). Prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

# bench/hub.py would shadow the `hub` package when this runs as a script: repo root first.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hub.app import create_app
from hub.config import parse_config
from hub.upstreams import tracing
from hub.upstreams.base import ModelState, UpstreamRequest, UpstreamResponse
from saia.base.tracing import TracingConfig
from saia.sandbox.otlp import OtlpCollector, read_spans

ANSWER = json.dumps(
    {
        "id": "x",
        "object": "chat.completion",
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9},
    }
).encode()
TOKEN = b'data: {"id":"x","object":"chat.completion.chunk","model":"m","choices":[{"index":0,"delta":{"content":" w"}}]}\n\n'  # noqa: E501
STREAM = TOKEN * 16 + (
    b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":16}}\n\ndata: [DONE]\n\n'
)


class CannedUpstream:
    name = "local"
    default_status = "ready"
    usage_per_chunk = False

    @asynccontextmanager
    async def stream(self, request: UpstreamRequest) -> AsyncIterator[UpstreamResponse]:
        streaming = b'"stream":true' in request.body

        async def chunks() -> AsyncIterator[bytes]:
            yield STREAM if streaming else ANSWER

        kind = "text/event-stream" if streaming else "application/json"
        yield UpstreamResponse(200, [("content-type", kind), ("date", "now")], chunks())

    async def states(self) -> dict[str, ModelState]:
        return {}


def scope_of(body: bytes, key: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"authorization", f"Bearer {key}".encode()),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 5555),
        "server": ("127.0.0.1", 8000),
    }


async def one_request(app: Any, scope: dict[str, Any], body: bytes) -> None:
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    statuses: list[int] = []
    stays = asyncio.Event()  # the client never disconnects

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await stays.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await app(scope, receive, send)
    if statuses != [200]:
        raise SystemExit(f"the hub answered {statuses}")


async def requests(app: Any, scope: dict[str, Any], body: bytes, count: int) -> None:
    for _ in range(count):
        await one_request(app, scope, body)


async def measure(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="saia-bench-cpu-") as root:
        upstream = {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}
        config = parse_config(
            {
                "data_dir": root,
                "upstreams": {"local": upstream},
                "models": [{"id": "m", "upstream": "local"}],
            }
        )
        app = create_app(config, {"SAIA_HUB_ADMIN_TOKEN": ""})
        async with app.router.lifespan_context(app):
            services = app.state.services
            services.upstreams["local"] = CannedUpstream()
            _record, new = await services.keys.create(name="bench", now=time.time())
            for stream in (False, True):
                message = {"role": "user", "content": "one two three"}
                body = json.dumps({"model": "m", "stream": stream, "messages": [message]}).encode()
                scope = scope_of(body, new.secret)
                for traced in (False, True) if args.tracing else (False,):
                    if traced:
                        tracing.start(TracingConfig(otlp_endpoint=args.collector.endpoint))
                    await rounds(args, app, scope, body, stream, traced)
                    tracing.stop()  # flushes what is queued (a bench: blocking is fine here)


async def rounds(
    args: argparse.Namespace,
    app: Any,
    scope: dict[str, Any],
    body: bytes,
    stream: bool,
    traced: bool,
) -> None:
    await requests(app, scope, body, args.requests // 3)  # warm-up
    per_request = []
    for _ in range(args.rounds):
        start = time.process_time()
        await requests(app, scope, body, args.requests)
        per_request.append((time.process_time() - start) / args.requests * 1e6)
    kind = "streamed 16-token chat" if stream else "non-streamed chat"
    mode = (" tracing on" if traced else " tracing off") if args.tracing else ""
    print(
        f"{kind}{mode}: hub CPU per request median {statistics.median(per_request):.0f} us,"
        f" min {min(per_request):.0f} us ({args.rounds} x {args.requests})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tracing", action="store_true", help="also measure tracing on")
    args = parser.parse_args()
    if not args.tracing:
        asyncio.run(measure(args))
        return
    with (
        tempfile.TemporaryDirectory(prefix="saia-bench-otlp-") as spans,
        OtlpCollector(Path(spans) / "spans.jsonl") as args.collector,
    ):
        asyncio.run(measure(args))
        time.sleep(1)  # the collector writes what the last flush sent
        print(f"spans received by the collector: {len(read_spans(args.collector.out))}")


if __name__ == "__main__":
    main()
