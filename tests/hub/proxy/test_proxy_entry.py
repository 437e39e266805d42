"""One way into the proxy (issue 10): HubApp answers every request to a proxied path itself,
under a root_path too, with the hub's one error mapping; FastAPI only documents them."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from hub.app import create_app
from tests.fixtures.standin import STANDIN_MODEL
from tests.hub.helpers import ADMIN_TOKEN, hub_config


async def test_proxied_paths_under_a_root_path_and_their_errors(
    tmp_path: Path, standin_server: str
) -> None:
    app = create_app(
        hub_config(tmp_path, standin_server, STANDIN_MODEL), {"SAIA_HUB_ADMIN_TOKEN": ADMIN_TOKEN}
    )
    body = {"model": STANDIN_MODEL, "prompt": "a b", "max_tokens": 2}
    async with app.router.lifespan_context(app):
        _record, new = await app.state.services.keys.create(name="t", now=time.time())
        transport = httpx.ASGITransport(app=app, root_path="/api")
        headers = {"authorization": f"Bearer {new.secret}"}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://hub", headers=headers
        ) as http:
            answer = await http.post("/api/v1/completions", json=body)
            wrong_method = await http.get("/api/v1/completions")
            no_model = await http.post("/api/v1/completions", json={"prompt": "x"})
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 2
    assert answer.headers["x-request-id"].startswith("req-")
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    for response in (wrong_method, no_model):
        assert response.headers["content-type"] == "application/json"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_the_openapi_document_describes_the_proxied_paths(tmp_path: Path) -> None:
    app = create_app(hub_config(tmp_path, "http://127.0.0.1:9", "m"), {})
    paths = app.openapi()["paths"]
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/tokenize"):
        operation = paths[path]["post"]
        body = operation["requestBody"]["content"]["application/json"]["schema"]
        assert "model" in body["required"]
        assert operation["responses"]["4XX"]["content"]["application/json"]["schema"]
    chat = paths["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]
    assert chat["schema"]["properties"]["stream"] == {"type": ["boolean", "null"]}
    assert app.openapi() is app.openapi()  # built once
