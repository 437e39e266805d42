"""The hub over real HTTP: uvicorn on 127.0.0.1, the stand-in model server as upstream, and
the official `openai` client unchanged."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.fixtures.standin import STANDIN_MODEL
from tests.hub.helpers import RunningHub, hub_config, running_hub


@pytest.fixture
async def hub(tmp_path: Path, standin_server: str) -> AsyncIterator[RunningHub]:
    config = hub_config(tmp_path, standin_server, STANDIN_MODEL)
    async with running_hub(config) as running:
        yield running


def client(hub: RunningHub, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{hub.url}/v1",
        api_key=key,
        max_retries=0,
        http_client=httpx.AsyncClient(trust_env=False),
    )


async def test_models_list(hub: RunningHub) -> None:
    api = client(hub, await hub.create_key())
    page = await api.models.list()
    assert [m.id for m in page.data] == [STANDIN_MODEL]
    entry = page.data[0].model_dump()
    assert entry["status"] == "ready" and entry["object"] == "model"
    assert entry["input"] == ["text"] and "demand" in entry
    retrieved = await api.models.retrieve(STANDIN_MODEL)
    assert retrieved.id == STANDIN_MODEL


async def test_chat_completion_and_usage_row(hub: RunningHub) -> None:
    api = client(hub, await hub.create_key(owner="alice"))
    answer = await api.chat.completions.create(
        model=STANDIN_MODEL, messages=[{"role": "user", "content": "one two three"}], max_tokens=3
    )
    assert answer.choices[0].message.content
    assert answer.usage is not None
    rows = await recorded_rows(hub, 1)
    assert len(rows) == 1
    assert rows[0]["prompt_tokens"] == answer.usage.prompt_tokens
    assert rows[0]["completion_tokens"] == answer.usage.completion_tokens
    assert rows[0]["user_name"] == "alice" and rows[0]["status"] == 200


async def test_streaming_chat_is_incremental_and_usage_stripped(
    tmp_path: Path, standin_factory: object
) -> None:
    slow = standin_factory("slow", token_delay=0.2)  # type: ignore[operator]
    config = hub_config(tmp_path, slow.url, "slow")
    async with running_hub(config) as hub:
        api = client(hub, await hub.create_key())
        stream = await api.chat.completions.create(
            model="slow",
            messages=[{"role": "user", "content": "a b c d e f"}],
            max_tokens=5,
            stream=True,
        )
        arrivals: list[float] = []
        chunks = []
        async for chunk in stream:
            arrivals.append(time.monotonic())
            chunks.append(chunk)
        # Tokens come 0.2 s apart from the upstream and must reach the client as they come.
        assert arrivals[-1] - arrivals[1] >= 0.5
        assert all(chunk.usage is None for chunk in chunks), "unasked usage chunk leaked"
        assert all(chunk.choices for chunk in chunks)
        rows = await recorded_rows(hub, 1)
        assert rows[0]["completion_tokens"] == 5 and rows[0]["stream"]
        assert rows[0]["ttft_ms"] is not None and rows[0]["ttft_ms"] < rows[0]["latency_ms"]


async def test_streaming_with_usage_requested_keeps_the_chunk(hub: RunningHub) -> None:
    api = client(hub, await hub.create_key())
    stream = await api.chat.completions.create(
        model=STANDIN_MODEL,
        messages=[{"role": "user", "content": "x y"}],
        max_tokens=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].usage is not None and not chunks[-1].choices
    rows = await recorded_rows(hub, 1)
    assert rows[0]["prompt_tokens"] == chunks[-1].usage.prompt_tokens


async def test_completion_and_embeddings(hub: RunningHub) -> None:
    api = client(hub, await hub.create_key())
    text = await api.completions.create(model=STANDIN_MODEL, prompt="hello world", max_tokens=2)
    assert text.choices[0].text
    embedding = await api.embeddings.create(model=STANDIN_MODEL, input=["a", "b"])
    assert len(embedding.data) == 2 and len(embedding.data[0].embedding) > 0
    endpoints = sorted(row["endpoint"] for row in await recorded_rows(hub, 2))
    assert endpoints == ["completions", "embeddings"]


async def test_unknown_body_fields_pass_through(hub: RunningHub) -> None:
    async with hub.client(await hub.create_key()) as http:
        response = await http.post(
            "/v1/chat/completions",
            json={
                "model": STANDIN_MODEL,
                "messages": [{"role": "user", "content": "q"}],
                "timeout": 30,
                "stream_options": None,
                "max_tokens": 1,
            },
        )
    assert response.status_code == 200, response.text


async def test_auth_errors_map_to_client_exceptions(hub: RunningHub) -> None:
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.AuthenticationError):
        await client(hub, "sk-saia-nonsense").chat.completions.create(
            model=STANDIN_MODEL,
            messages=messages,  # type: ignore[arg-type]
        )
    limited = await hub.create_key(allowed_models=["other"])
    with pytest.raises(openai.PermissionDeniedError):
        await client(hub, limited).chat.completions.create(
            model=STANDIN_MODEL,
            messages=messages,  # type: ignore[arg-type]
        )
    assert [m.id async for m in client(hub, limited).models.list()] == []
    with pytest.raises(openai.NotFoundError):
        await client(hub, await hub.create_key()).chat.completions.create(
            model="no-such-model",
            messages=messages,  # type: ignore[arg-type]
        )


async def test_revoked_and_expired_keys_are_refused(hub: RunningHub) -> None:
    expired = await hub.create_key(expires_at=time.time() - 1)
    revoked_record, revoked_new = await hub.services.keys.create(name="r", now=time.time())
    await hub.services.keys.revoke(revoked_record.id, time.time())
    async with hub.client() as http:
        for key in (expired, revoked_new.secret, None):
            headers = {"authorization": f"Bearer {key}"} if key else {}
            response = await http.get("/v1/models", headers=headers)
            assert response.status_code == 401
            error = response.json()["error"]
            assert error["type"] == "authentication_error" and error["message"]


async def test_bad_requests_get_openai_errors(hub: RunningHub) -> None:
    async with hub.client(await hub.create_key()) as http:
        not_json = await http.post("/v1/chat/completions", content=b"{nope")
        no_model = await http.post("/v1/chat/completions", json={"messages": []})
        array = await http.post("/v1/chat/completions", json=[1])
        huge = await http.post(
            "/v1/chat/completions", content=b"x" * (hub.services.config.max_body_bytes + 1)
        )
        nowhere = await http.get("/v1/nothing")
        wrong_method = await http.get("/v1/chat/completions")
    for response, status in ((not_json, 400), (no_model, 400), (array, 400), (huge, 413)):
        assert response.status_code == status
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert nowhere.status_code == 404 and "error" in nowhere.json()
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


async def test_rate_limit_429_with_headers(hub: RunningHub) -> None:
    key = await hub.create_key(limits=_limits(requests_per_minute=2))
    body = {"model": STANDIN_MODEL, "prompt": "p", "max_tokens": 1}
    async with hub.client(key) as http:
        first = await http.post("/v1/completions", json=body)
        second = await http.post("/v1/completions", json=body)
        third = await http.post("/v1/completions", json=body)
    assert first.headers["x-ratelimit-limit-minute"] == "2"
    assert first.headers["x-ratelimit-remaining-minute"] == "1"
    assert second.headers["x-ratelimit-remaining-minute"] == "0"
    assert int(first.headers["ratelimit-reset"]) <= 60
    assert third.status_code == 429
    assert third.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(third.headers["retry-after"]) <= 60
    with pytest.raises(openai.RateLimitError):
        await client(hub, key).completions.create(model=STANDIN_MODEL, prompt="p", max_tokens=1)


async def test_token_limit(hub: RunningHub) -> None:
    key = await hub.create_key(limits=_limits(tokens_per_day=3))
    body = {"model": STANDIN_MODEL, "prompt": "a b c", "max_tokens": 2}
    async with hub.client(key) as http:
        assert (await http.post("/v1/completions", json=body)).status_code == 200
        await hub.services.recorder.flush()  # tokens are counted by the batch writer
        refused = await http.post("/v1/completions", json=body)
    assert refused.status_code == 429 and "tokens per day" in refused.json()["error"]["message"]


async def test_concurrency_cap(tmp_path: Path, standin_factory: object) -> None:
    slow = standin_factory("slow", token_delay=0.1)  # type: ignore[operator]
    async with running_hub(hub_config(tmp_path, slow.url, "slow")) as hub:
        key = await hub.create_key(limits=_limits(concurrent=2))
        body = {"model": "slow", "prompt": "a b c d e f g h i j", "max_tokens": 8}
        async with hub.client(key) as http:
            results = await asyncio.gather(
                *(http.post("/v1/completions", json=body) for _ in range(4))
            )
        statuses = sorted(r.status_code for r in results)
        assert statuses.count(200) == 2 and statuses.count(429) == 2
        assert hub.services.admission.in_flight == {}


async def test_streams_cancelled_by_clients_release_everything(
    tmp_path: Path, standin_factory: object
) -> None:
    slow = standin_factory("slow", token_delay=0.05)  # type: ignore[operator]
    async with running_hub(hub_config(tmp_path, slow.url, "slow")) as hub:
        key = await hub.create_key(limits=_limits(concurrent=50))
        words = " ".join(f"w{i}" for i in range(200))  # the stand-in echoes the prompt
        body = {"model": "slow", "prompt": words, "max_tokens": 200, "stream": True}

        async def abandon(http: httpx.AsyncClient) -> None:
            async with http.stream("POST", "/v1/completions", json=body) as response:
                async for _ in response.aiter_bytes():
                    break  # one chunk, then the client goes away

        async with hub.client(key) as http:
            await asyncio.gather(*(abandon(http) for _ in range(20)))
        for _ in range(100):
            in_flight = hub.services.metrics.in_flight.labels("slow", "local")._value.get()
            if hub.services.admission.in_flight == {} and in_flight == 0:
                break
            await asyncio.sleep(0.05)
        assert hub.services.admission.in_flight == {}
        assert hub.services.metrics.in_flight.labels("slow", "local")._value.get() == 0
        rows = await recorded_rows(hub, 20)
        assert [row["status"] for row in rows] == [499] * 20


async def test_upstream_down_is_502(tmp_path: Path) -> None:
    from saia.sandbox.process import free_port

    config = hub_config(tmp_path, f"http://127.0.0.1:{free_port()}", "gone")
    async with running_hub(config) as hub, hub.client(await hub.create_key()) as http:
        response = await http.post("/v1/completions", json={"model": "gone", "prompt": "a"})
    assert response.status_code == 502 and response.json()["error"]["message"]


async def test_health_metrics_and_admin(hub: RunningHub) -> None:
    from tests.hub.helpers import ADMIN_TOKEN

    async with hub.client() as http:
        assert (await http.get("/health")).status_code == 200
        created = await http.post(
            "/admin/keys",
            json={"name": "via-api", "owner": "bob", "limits": {"concurrent": 3}},
            headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
        )
        assert created.status_code == 201, created.text
        secret, key_id = created.json()["secret"], created.json()["key"]["id"]
        denied = await http.get("/admin/keys", headers={"authorization": f"Bearer {secret}"})
        assert denied.status_code == 403
        answer = await http.post(
            "/v1/completions",
            json={"model": STANDIN_MODEL, "prompt": "a", "max_tokens": 1},
            headers={"authorization": f"Bearer {secret}"},
        )
        assert answer.status_code == 200
        admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
        metrics = (await http.get("/metrics", headers=admin)).text
        assert 'saia_hub_requests_total{endpoint="completions"' in metrics
        assert "bob" not in metrics and key_id not in metrics
        listing = (await http.get("/admin/keys", headers=admin)).json()
        assert [k["id"] for k in listing] == [key_id] and "digest" not in listing[0]
        await hub.services.recorder.flush()
        usage = await http.get(
            "/admin/usage", params={"since": "2020-01-01", "by": "user"}, headers=admin
        )
        assert usage.json()[0]["user"] == "bob" and usage.json()[0]["requests"] == 1
        revoked = await http.delete(f"/admin/keys/{key_id}", headers=admin)
        assert revoked.status_code == 200
        after = await http.get("/v1/models", headers={"authorization": f"Bearer {secret}"})
        assert after.status_code == 401
        assert (await http.get("/openapi.json")).status_code == 404  # config api_docs: off


def _limits(**values: int) -> object:
    from hub.config import LimitsConfig

    return LimitsConfig(**values)


async def recorded_rows(hub: RunningHub, count: int) -> list[dict[str, object]]:
    """The usage rows once `count` are written. A stream's row is queued when the hub's
    response ends, which can be just after the client has read `[DONE]`: poll (bounded)."""
    async with asyncio.timeout(10):
        while True:
            await hub.services.recorder.flush()
            rows = await usage_rows(hub)
            if len(rows) >= count:
                return rows
            await asyncio.sleep(0.05)


async def usage_rows(hub: RunningHub) -> list[dict[str, object]]:
    from sqlalchemy import select

    from hub.storage import usage

    async with hub.services.engine.connect() as connection:
        result = await connection.execute(select(usage).order_by(usage.c.id))
        return [dict(row._mapping) for row in result.all()]


async def test_identity_from_a_trusted_proxy_header(tmp_path: Path, standin_server: str) -> None:
    auth = {
        "proxy_user_header": "X-Forwarded-User",
        "trusted_proxies": ["127.0.0.0/8"],
        "user_limits": {"requests_per_day": 1},
    }
    config = hub_config(tmp_path, standin_server, STANDIN_MODEL, auth=auth)
    body = {"model": STANDIN_MODEL, "prompt": "a", "max_tokens": 1}
    async with running_hub(config) as hub, hub.client() as http:
        first = await http.post("/v1/completions", json=body, headers={"x-forwarded-user": "eve"})
        again = await http.post("/v1/completions", json=body, headers={"x-forwarded-user": "eve"})
        other = await http.post("/v1/completions", json=body, headers={"x-forwarded-user": "fay"})
        anonymous = await http.post("/v1/completions", json=body)
        users = [row["user_name"] for row in await recorded_rows(hub, 3)]
    assert first.status_code == 200 and first.headers["x-ratelimit-limit-day"] == "1"
    assert again.status_code == 429  # the user's own daily limit
    assert other.status_code == 200
    assert anonymous.status_code == 401
    assert users == ["eve", "eve", "fay"]


async def test_proxy_header_from_an_untrusted_address_is_ignored(
    tmp_path: Path, standin_server: str
) -> None:
    auth = {"proxy_user_header": "X-Forwarded-User", "trusted_proxies": ["10.9.9.0/24"]}
    config = hub_config(tmp_path, standin_server, STANDIN_MODEL, auth=auth)
    async with running_hub(config) as hub, hub.client() as http:
        response = await http.get("/v1/models", headers={"x-forwarded-user": "mallory"})
    assert response.status_code == 401


async def test_forwarded_for_neither_spoofs_nor_hides_the_proxy(
    tmp_path: Path, standin_server: str
) -> None:
    """The hub judges the direct peer: X-Forwarded-For (which a reverse proxy appends and a
    client can forge) must not replace it, or a forged address would pass trusted_proxies and
    a real local proxy would not."""
    forged = {"x-forwarded-user": "mallory", "x-forwarded-for": "10.9.9.7"}
    auth = {"proxy_user_header": "X-Forwarded-User", "trusted_proxies": ["10.9.9.0/24"]}
    config = hub_config(tmp_path / "a", standin_server, STANDIN_MODEL, auth=auth)
    async with running_hub(config) as hub, hub.client() as http:
        spoofed = await http.get("/v1/models", headers=forged)
    assert spoofed.status_code == 401
    auth = {"proxy_user_header": "X-Forwarded-User", "trusted_proxies": ["127.0.0.1/32"]}
    config = hub_config(tmp_path / "b", standin_server, STANDIN_MODEL, auth=auth)
    behind_proxy = {"x-forwarded-user": "eve", "x-forwarded-for": "198.51.100.4"}
    async with running_hub(config) as hub, hub.client() as http:
        proxied = await http.get("/v1/models", headers=behind_proxy)
    assert proxied.status_code == 200


async def test_alias_and_hooks(tmp_path: Path, standin_server: str) -> None:
    alias = {
        "id": "friendly",
        "upstream": "local",
        "upstream_model": STANDIN_MODEL,
        "hooks": {"system_prompt": "Answer briefly.", "max_tokens_cap": 3},
    }
    config = hub_config(tmp_path, standin_server, STANDIN_MODEL, models=[alias])
    async with running_hub(config) as hub:
        api = client(hub, await hub.create_key())
        messages = [{"role": "user", "content": "w1 w2 w3 w4 w5 w6 w7 w8"}]
        answer = await api.chat.completions.create(
            model="friendly",
            messages=messages,
            max_tokens=100,  # type: ignore[arg-type]
        )
        assert answer.model == "friendly"
        assert answer.usage is not None and answer.usage.completion_tokens <= 3
        # The stand-in echoes the prompt: the system prompt was prepended.
        assert "Answer" in (answer.choices[0].message.content or "")
        stream = await api.chat.completions.create(
            model="friendly",
            messages=messages,
            stream=True,  # type: ignore[arg-type]
        )
        assert {chunk.model async for chunk in stream} == {"friendly"}


async def test_timeouts_504_before_and_error_event_after_the_stream_started(
    tmp_path: Path, standin_factory: object
) -> None:
    slow = standin_factory("slow", token_delay=1.0)  # type: ignore[operator]
    upstream = {
        "kind": "openai",
        "base_url": f"{slow.url}/v1",
        "timeouts": {"connect": 2, "first_byte": 0.5, "idle": 0.5},
    }
    config = hub_config(tmp_path, slow.url, "slow", upstreams={"local": upstream})
    words = "a b c d e f g h"
    async with running_hub(config) as hub, hub.client(await hub.create_key()) as http:
        whole = await http.post(
            "/v1/completions", json={"model": "slow", "prompt": words, "max_tokens": 5}
        )
        assert whole.status_code == 504 and whole.json()["error"]["type"] == "timeout_error"
        events = []
        body = {"model": "slow", "prompt": words, "max_tokens": 5, "stream": True}
        async with http.stream("POST", "/v1/completions", json=body) as stream:
            assert stream.status_code == 200
            async for line in stream.aiter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
        assert events[-1]["object"] == "error"
        assert events[-1]["error"]["type"] == "timeout_error"
        assert [row["status"] for row in await recorded_rows(hub, 2)] == [504, 504]


async def test_tokenize_passes_through(hub: RunningHub) -> None:
    async with hub.client(await hub.create_key()) as http:
        response = await http.post("/tokenize", json={"model": STANDIN_MODEL, "prompt": "a b c"})
    assert response.status_code == 200, response.text
    assert response.json()["count"] == 3
