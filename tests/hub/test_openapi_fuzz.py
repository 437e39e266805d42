"""Schemathesis over the hub's own OpenAPI document: a real hub (`saia hub serve`, a
subprocess stopped by pid) with a valid key, the stand-in model server as upstream. Whatever
the generated request, valid or not, no 5xx, and every error in OpenAI's error shape
(JSON, never sniffed).

The schema comes from the app object (`app.openapi()`), not from /openapi.json, which may be
off or behind authentication. Bounded: a few examples per operation (well under 60 s)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from hub.app import create_app
from hub.config import parse_config
from saia.sandbox.process import free_port, stop_process
from tests.fixtures.standin import STANDIN_MODEL

MAX_EXAMPLES = 25
ERROR_KEYS = {"message", "type", "param", "code"}


def _schema() -> dict[str, Any]:
    """The hub's OpenAPI document, with `model` drawn from the served model (or a wrong
    one), so that generated requests reach the upstream instead of stopping at a 404."""
    config = parse_config({"upstreams": {}, "models": []})
    document = create_app(config, {}).openapi()
    for item in document["paths"].values():
        body = item.get("post", {}).get("requestBody", {}).get("content", {})
        schema = body.get("application/json", {}).get("schema", {})
        if "model" in schema.get("properties", {}):
            schema["properties"]["model"] = {"enum": [STANDIN_MODEL, "no-such-model"]}
    return document


schema = schemathesis.openapi.from_dict(_schema())
# Valid requests and invalid ones (wrong types, missing fields): both must get clean answers.
schema.config.generation.update(modes=list(schemathesis.GenerationMode))


@pytest.fixture(scope="module")
def hub_url(standin_server: str) -> Iterator[tuple[str, str]]:
    """`saia hub serve` on a free port with one key; (base URL, key)."""
    with tempfile.TemporaryDirectory(prefix="saia-fuzz-") as root:
        port = free_port()
        config = Path(root) / "hub.yaml"
        config.write_text(
            f"port: {port}\ndata_dir: {root}/data\nupstreams:\n  local:\n    kind: openai\n"
            f"    base_url: {standin_server}/v1\n    usage_per_chunk: true\n"
            f"models:\n  - id: {STANDIN_MODEL}\n    upstream: local\n"
        )
        key = _create_key(config)
        env = {**os.environ, "SAIA_HUB_ADMIN_TOKEN": ""}
        argv = [sys.executable, "-m", "saia", "hub", "serve", "-c", str(config)]
        with open(Path(root) / "hub.log", "wb") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
            try:
                _wait_healthy(f"http://127.0.0.1:{port}", proc)
                yield f"http://127.0.0.1:{port}", key
            finally:
                stop_process(proc, 10)


def _create_key(config: Path) -> str:
    argv = [sys.executable, "-m", "saia", "hub", "keys", "create", "-c", str(config)]
    argv += ["--name", "fuzz", "--user", "fuzz"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    return result.stdout.strip()


def _wait_healthy(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=1, trust_env=False).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the hub did not answer /health (exit code {proc.poll()})")


def openai_error_shape(response: schemathesis.Response) -> None:
    if response.status_code < 400:
        return
    assert response.headers.get("content-type", [""])[0].startswith("application/json")
    assert response.headers.get("x-content-type-options") == ["nosniff"]
    error = response.json()["error"]
    assert set(error) == ERROR_KEYS, error
    assert isinstance(error["message"], str) and isinstance(error["type"], str)


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_no_server_error_and_openai_errors(case: schemathesis.Case, hub_url: Any) -> None:
    url, key = hub_url
    response = case.call(base_url=url, headers={"authorization": f"Bearer {key}"}, timeout=30)
    case.validate_response(response, checks=[not_a_server_error])
    if case.path == "/v1/messages":
        anthropic_error_shape(response)
    else:
        openai_error_shape(response)


def anthropic_error_shape(response: schemathesis.Response) -> None:
    """Anthropic's Messages API answers errors in Anthropic's shape (its SDKs read it)."""
    if response.status_code < 400:
        return
    assert response.headers.get("x-content-type-options") == ["nosniff"]
    body = response.json()
    assert body.get("type") == "error" and set(body["error"]) == {"type", "message"}, body
