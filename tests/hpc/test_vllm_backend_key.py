"""The real `vllm serve` in a sandbox Slurm job answers nobody without the job's key.

vLLM 0.32 checks VLLM_API_KEY only under /v1 (and /v2, /inference, /cohere);
`/invocations`, `/tokenize`, `/pooling`, `/score`, `/metrics` and the rest answered
anyone who found the port (issue 9 item 6). The job adds slurm/saia_backend_auth.py as
vLLM middleware: every route vLLM lists in its own OpenAPI schema, plus `/metrics` and
the docs pages, must now answer 401 without the key, `/health` stays open, and with the
key the server still works. One vLLM (about 3 GB RSS, a minute or more).
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from hpc.jobs.script import render_job
from hpc.jobs.slurm import SlurmJobSystem
from hpc.jobs.system import JobTag
from hpc.scheduler.health import read_backend_key
from saia.sandbox.slurm import SlurmSandbox
from saia.sandbox.vllm import VllmInstall
from tests.hpc.helpers import wait_endpoint, wait_healthy
from tests.hpc.test_vllm_slurm import (
    SERVICE,
    START_LIMIT,
    gone_from_slurm,
    vllm_config,
)

pytestmark = pytest.mark.vllm
# Served outside the OpenAPI schema: the Prometheus mount and FastAPI's own pages.
UNLISTED = [("GET", "/metrics"), ("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/redoc")]


@pytest.fixture
def prefix(slurm_cluster: SlurmSandbox) -> Any:
    name = "k" + uuid.uuid4().hex[:8]
    yield name
    slurm_cluster.run(["scancel", f"--name={name}-{SERVICE}"])


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


async def test_vllm_job_refuses_every_path_without_its_key(
    slurm_cluster: SlurmSandbox, vllm_install: VllmInstall, prefix: str, tmp_path: Path
) -> None:
    config = vllm_config(slurm_cluster, vllm_install, tmp_path, prefix)
    tag = JobTag(prefix, "key-test")
    jobs = SlurmJobSystem(config, tag)
    job_id = await jobs.submit(render_job(config.services[0], config, tag))
    try:
        endpoint = await wait_endpoint(tmp_path, job_id, START_LIMIT)
        key = read_backend_key(tmp_path, job_id)
        assert key, "the job wrote no 0600 api_key"
        auth = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(base_url=endpoint.url, trust_env=False, timeout=60) as client:
            await wait_healthy(client, START_LIMIT, poll_s=1)  # /health: open, liveness only
            schema = (await client.get("/openapi.json", headers=auth)).json()
            routes = [r for r in served_routes(schema) if r[1] != "/health"]
            assert ("POST", "/invocations") in routes and ("POST", "/tokenize") in routes
            keyless = await keyless_answers(client, routes, {})
            wrong = await keyless_answers(client, routes, {"Authorization": "Bearer nope"})
            assert {r: s for r, s in keyless.items() if s != 401} == {}
            assert {r: s for r, s in wrong.items() if s != 401} == {}
            await check_works_with_key(client, auth)
    finally:
        await jobs.cancel(job_id)
        await jobs.aclose()
    await gone_from_slurm(config, tag, job_id)


async def check_works_with_key(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    models = await client.get("/v1/models", headers=auth)
    assert [m["id"] for m in models.json()["data"]] == [SERVICE]
    tokens = await client.post("/tokenize", json={"prompt": "hello world"}, headers=auth)
    assert tokens.status_code == 200 and tokens.json()["count"] >= 2
    chat = {
        "model": SERVICE,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
    }
    answer = await client.post("/invocations", json=chat, headers=auth)
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] == 3
    metrics = await client.get("/metrics", headers=auth)
    assert metrics.status_code == 200 and "vllm:num_requests_running" in metrics.text
