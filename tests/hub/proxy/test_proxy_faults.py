"""Hostile clients and faulty upstreams (issue 9): nothing lost, nothing free, nothing leaked.

The hub runs under a real uvicorn with the stand-in model server as upstream; where an
upstream must misbehave in a way the stand-in never does (HTML errors, provider headers),
a small Starlette app served by uvicorn on 127.0.0.1 plays that upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from saia.sandbox.process import free_port
from tests.fixtures.standin import STANDIN_MODEL
from tests.hpc.helpers import until
from tests.hub.helpers import RunningHub, hub_config, running_hub
from tests.hub.test_api import _limits, recorded_rows

ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture
async def hub(tmp_path: Path, standin_server: str) -> AsyncIterator[RunningHub]:
    async with running_hub(hub_config(tmp_path, standin_server, STANDIN_MODEL)) as running:
        yield running


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-content-type-options"] == "nosniff"
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == ERROR_KEYS and isinstance(error["message"], str)
    return error


# -- item 1: `stream` is decided exactly as the upstream would, and streams are charged ----
@pytest.mark.parametrize("flag", [1, "true", "yes", 1.0, [True], {"x": 1}])
async def test_a_stream_flag_that_is_not_a_boolean_is_refused(hub: RunningHub, flag: Any) -> None:
    """vLLM (pydantic) reads 1 and "true" as true: a hub that read them as false streamed
    uncharged. Only true, false and null are taken; everything else is a 400."""
    body = {"model": STANDIN_MODEL, "prompt": "a b c", "max_tokens": 2, "stream": flag}
    async with hub.client(await hub.create_key()) as http:
        response = await http.post("/v1/completions", json=body)
    error = assert_openai_error(response, 400)
    assert error["param"] == "stream"


async def test_stream_options_that_are_not_booleans_are_refused(hub: RunningHub) -> None:
    body = {
        "model": STANDIN_MODEL,
        "prompt": "a b c",
        "stream": True,
        "stream_options": {"include_usage": "true"},
    }
    async with hub.client(await hub.create_key()) as http:
        response = await http.post("/v1/completions", json=body)
        listed = await http.post("/v1/completions", json={**body, "stream_options": [1]})
    assert assert_openai_error(response, 400)["param"] == "stream_options.include_usage"
    assert assert_openai_error(listed, 400)["param"] == "stream_options"


async def test_token_limit_holds_for_streams(hub: RunningHub) -> None:
    key = await hub.create_key(limits=_limits(tokens_per_day=10))
    body = {"model": STANDIN_MODEL, "prompt": "a b c d e f", "max_tokens": 5, "stream": True}
    async with hub.client(key) as http:
        first = await http.post("/v1/completions", json=body)
        assert first.status_code == 200 and "[DONE]" in first.text
        rows = await recorded_rows(hub, 1)
        assert (rows[0]["prompt_tokens"], rows[0]["completion_tokens"]) == (6, 5)
        refused = await http.post("/v1/completions", json=body)
    assert assert_openai_error(refused, 429)["type"] == "rate_limit_error"


# -- item 2: a client that leaves mid-stream pays for what was generated ------------------
async def _leave_after(http: httpx.AsyncClient, body: dict[str, Any], events: int) -> None:
    seen = 0
    async with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            seen += line.startswith("data: ")
            if seen >= events:
                break  # the client goes away mid-stream


@pytest.mark.parametrize("per_chunk", [True, False])
async def test_a_client_that_leaves_mid_stream_is_charged(
    tmp_path: Path, standin_factory: Any, per_chunk: bool
) -> None:
    """With usage on every chunk (vLLM's continuous_usage_stats) the hub knows prompt and
    completion tokens at the disconnect; without it, each content event counts one token."""
    slow = standin_factory("slow", token_delay=0.05)
    upstream = {"kind": "openai", "base_url": f"{slow.url}/v1", "usage_per_chunk": per_chunk}
    config = hub_config(tmp_path, slow.url, "slow", upstreams={"local": upstream})
    words = " ".join(f"w{i}" for i in range(100))  # the stand-in echoes the prompt
    body = {"model": "slow", "prompt": words, "max_tokens": 100, "stream": True}
    async with running_hub(config) as hub, hub.client(await hub.create_key()) as http:
        await _leave_after(http, body, 5)
        row = (await recorded_rows(hub, 1))[0]
    assert row["status"] == 499 and row["stream"]
    assert 4 <= int(str(row["completion_tokens"])) < 100
    assert row["prompt_tokens"] == (100 if per_chunk else 0)


async def test_usage_on_every_chunk_is_not_shown_to_a_client_that_did_not_ask(
    tmp_path: Path, standin_server: str
) -> None:
    upstream = {"kind": "openai", "base_url": f"{standin_server}/v1", "usage_per_chunk": True}
    config = hub_config(tmp_path, standin_server, STANDIN_MODEL, upstreams={"local": upstream})
    body = {"model": STANDIN_MODEL, "prompt": "a b c", "max_tokens": 3, "stream": True}
    asked = {**body, "stream_options": {"include_usage": True}}
    async with running_hub(config) as hub, hub.client(await hub.create_key()) as http:
        plain = (await http.post("/v1/completions", json=body)).text
        with_usage = (await http.post("/v1/completions", json=asked)).text
        rows = await recorded_rows(hub, 2)
    assert '"usage"' not in plain and "[DONE]" in plain
    # Asked for the final usage only: that one chunk, not one per token.
    assert with_usage.count('"usage":{') == 1 and '"prompt_tokens":3' in with_usage
    assert [(r["prompt_tokens"], r["completion_tokens"]) for r in rows] == [(3, 3), (3, 3)]


# -- item 3: upstream errors and headers --------------------------------------------------
PROVIDER_HEADERS = {
    "openai-organization": "org-secret",
    "openai-processing-ms": "12",
    "x-ratelimit-remaining-requests": "3",
    "set-cookie": "session=abc",
    "x-upstream-debug": "internal-host-7",
}


async def _html_error(request: Request) -> Response:
    html = "<html><script>alert(1)</script><body>Bad Gateway from nginx</body></html>"
    return Response(html, 500, PROVIDER_HEADERS, media_type="text/html")


async def _ok(request: Request) -> Response:
    body = b'{"object":"list","data":[],"model":"fake","usage":{"prompt_tokens":1}}'
    return Response(body, 200, PROVIDER_HEADERS, media_type="application/json")


async def _json_error(request: Request) -> Response:
    body = b'{"error":{"message":"too long","type":"BadRequestError","param":null,"code":400},'
    body += b'"extra":"<b>x</b>"}'
    return Response(body, 400, PROVIDER_HEADERS, media_type="text/html")


async def _unasked_stream(request: Request) -> Response:
    body = b'data: {"choices":[{"text":"a"}]}\n\ndata: {"choices":[{"text":"b"}]}\n\n'
    body += b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2}}\n\n'
    return Response(body + b"data: [DONE]\n\n", media_type="text/event-stream")


@asynccontextmanager
async def fake_provider() -> AsyncIterator[str]:
    """An upstream that answers embeddings well, chat with HTML, completions with a JSON
    error in the wrong content type (each with provider headers) and /tokenize with an
    event stream nobody asked for."""
    app = Starlette(
        routes=[
            Route("/v1/embeddings", _ok, methods=["POST"]),
            Route("/v1/chat/completions", _html_error, methods=["POST"]),
            Route("/v1/completions", _json_error, methods=["POST"]),
            Route("/tokenize", _unasked_stream, methods=["POST"]),
        ]
    )
    port = free_port()
    config = uvicorn.Config(app, "127.0.0.1", port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve())
    try:
        await until(lambda: server.started or task.done(), 10, "no fake provider", 0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        async with asyncio.timeout(10):
            await task


async def test_upstream_errors_become_openai_json_and_provider_headers_stay_behind(
    tmp_path: Path,
) -> None:
    async with fake_provider() as url:
        config = hub_config(tmp_path, url, "fake")
        async with running_hub(config) as hub, hub.client(await hub.create_key()) as http:
            html = await http.post("/v1/chat/completions", json={"model": "fake"})
            wrapped = await http.post("/v1/completions", json={"model": "fake"})
            ok = await http.post("/v1/embeddings", json={"model": "fake", "input": "x"})
    error = assert_openai_error(html, 502)
    assert "<" not in error["message"] and "script" not in html.text
    assert assert_openai_error(wrapped, 400)["message"] == "too long"
    assert "extra" not in wrapped.json()
    assert ok.status_code == 200 and ok.headers["content-type"] == "application/json"
    for response in (html, wrapped, ok):
        assert response.headers["x-request-id"].startswith("req-")
        leaked = set(PROVIDER_HEADERS) & set(response.headers)
        assert not leaked, f"provider headers passed to the client: {leaked}"


async def test_an_answer_that_streams_unasked_is_metered_as_a_stream(tmp_path: Path) -> None:
    """The hub decides by what the upstream sends, not only by what it asked for."""
    async with fake_provider() as url:
        config = hub_config(tmp_path, url, "fake")
        async with running_hub(config) as hub, hub.client(await hub.create_key()) as http:
            response = await http.post("/tokenize", json={"model": "fake", "prompt": "x"})
            rows = await recorded_rows(hub, 1)
    assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n")
    assert (rows[0]["prompt_tokens"], rows[0]["completion_tokens"]) == (7, 2)
    assert rows[0]["stream"]


# -- item 4: hostile bodies ---------------------------------------------------------------
@pytest.mark.parametrize(
    "body",
    [
        b"[" * 200_000,
        b'{"model": "' + STANDIN_MODEL.encode() + b'", "prompt": ' + b"[" * 200_000,
        b'{"model": "x", "prompt": ' + b'{"a":' * 100_000 + b"1" + b"}" * 100_001,
    ],
)
async def test_deeply_nested_bodies_are_400(hub: RunningHub, body: bytes) -> None:
    async with hub.client(await hub.create_key()) as http:
        response = await http.post("/v1/completions", content=body)
    assert assert_openai_error(response, 400)["code"] == "invalid_json"
