"""The real `vllm serve` in a sandbox Slurm job answers nobody without the job's key.

vLLM 0.32 checks VLLM_API_KEY only under /v1 (and /v2, /inference, /cohere);
`/invocations`, `/tokenize`, `/pooling`, `/score`, `/metrics` and the rest answered
anyone who found the port (issue 9 item 6). The job adds slurm/saia_backend_auth.py as
vLLM middleware: every route vLLM lists in its own OpenAPI schema, plus `/metrics` and
the docs pages, must now answer 401 without the key, `/health` stays open, and with the
key the server still works. On the session's SmolLM2 job (`smollm2_job`, tests/fixtures/vllm.py).
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from tests.fixtures.vllm import VllmJob

pytestmark = pytest.mark.vllm
# Served outside the OpenAPI schema: the Prometheus mount and FastAPI's own pages.
UNLISTED = [("GET", "/metrics"), ("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/redoc")]


def served_routes(schema: dict[str, Any]) -> list[tuple[str, str]]:
    """(method, path) of every operation in vLLM's schema; `{param}` filled with `x`."""
    routes = []
    for path, operations in schema["paths"].items():
        concrete = re.sub(r"\{[^}]*\}", "x", path)
        routes += [(method.upper(), concrete) for method in operations]
    return sorted(set(routes)) + UNLISTED


async def keyless_answers(
    client: httpx.AsyncClient, routes: list[tuple[str, str]], headers: dict[str, str]
) -> dict[tuple[str, str], int]:
    found = {}
    for method, path in routes:
        body: dict[str, Any] | None = {} if method in ("POST", "PUT", "PATCH") else None
        found[method, path] = (
            await client.request(method, path, json=body, headers=headers)
        ).status_code
    return found


async def test_vllm_job_refuses_every_path_without_its_key(smollm2_job: VllmJob) -> None:
    assert smollm2_job.key, "the job wrote no 0600 api_key"
    auth = {"Authorization": f"Bearer {smollm2_job.key}"}
    async with httpx.AsyncClient(
        base_url=smollm2_job.url, trust_env=False, timeout=60, verify=smollm2_job.verify
    ) as client:
        assert (await client.get("/health")).status_code == 200  # open, liveness only
        schema = (await client.get("/openapi.json", headers=auth)).json()
        routes = [r for r in served_routes(schema) if r[1] != "/health"]
        assert ("POST", "/invocations") in routes and ("POST", "/tokenize") in routes
        keyless = await keyless_answers(client, routes, {})
        wrong = await keyless_answers(client, routes, {"Authorization": "Bearer nope"})
        assert {r: s for r, s in keyless.items() if s != 401} == {}
        assert {r: s for r, s in wrong.items() if s != 401} == {}
        await check_works_with_key(client, auth, smollm2_job.model)


async def check_works_with_key(client: httpx.AsyncClient, auth: dict[str, str], model: str) -> None:
    models = await client.get("/v1/models", headers=auth)
    assert [m["id"] for m in models.json()["data"]] == [model]
    tokens = await client.post("/tokenize", json={"prompt": "hello world"}, headers=auth)
    assert tokens.status_code == 200 and tokens.json()["count"] >= 2
    chat = {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
    }
    answer = await client.post("/invocations", json=chat, headers=auth)
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] == 3
    metrics = await client.get("/metrics", headers=auth)
    assert metrics.status_code == 200 and "vllm:num_requests_running" in metrics.text
