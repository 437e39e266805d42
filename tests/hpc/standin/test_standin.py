"""The stand-in model server, as a real subprocess, through httpx and the openai client."""

from __future__ import annotations

import asyncio
import json
import math
import signal
from collections.abc import Callable

import httpx
import openai
import pytest

from hpc.standin.model import EMBEDDING_DIM, embedding, reply_tokens
from tests.fixtures.standin import STANDIN_MODEL, StandinProcess

Factory = Callable[..., StandinProcess]


def chat_body(text: str, **extra: object) -> dict[str, object]:
    return {"model": STANDIN_MODEL, "messages": [{"role": "user", "content": text}], **extra}


def sse_events(text: str) -> list[str]:
    return [line.removeprefix("data: ") for line in text.split("\n\n") if line.strip()]


def test_reply_is_an_echo_cut_at_max_tokens() -> None:
    assert reply_tokens("a b c", 10) == (["echo:", "a", "b", "c"], "stop")
    assert reply_tokens("a b c", 2) == (["echo:", "a"], "length")


def test_embeddings_are_deterministic_unit_vectors() -> None:
    vector = embedding("hello")
    assert vector == embedding("hello") != embedding("other")
    assert len(vector) == EMBEDDING_DIM
    assert math.isclose(sum(v * v for v in vector), 1.0, rel_tol=1e-9)


async def test_health_models_and_metrics(standin_server: str) -> None:
    async with httpx.AsyncClient(base_url=standin_server) as client:
        health = await client.get("/health")
        assert health.status_code == 200 and health.content == b""
        models = (await client.get("/v1/models")).json()
        assert [(m["id"], m["owned_by"]) for m in models["data"]] == [
            (STANDIN_MODEL, "saia-standin")
        ]
        metrics = (await client.get("/metrics")).text
    assert f'vllm:num_requests_running{{model_name="{STANDIN_MODEL}"}} 0.0' in metrics
    assert f'vllm:num_requests_waiting{{model_name="{STANDIN_MODEL}"}} 0.0' in metrics


async def test_chat_and_completion_answers(standin_server: str) -> None:
    async with httpx.AsyncClient(base_url=standin_server) as client:
        chat = (await client.post("/v1/chat/completions", json=chat_body("one two"))).json()
        text = await client.post(
            "/v1/completions", json={"model": STANDIN_MODEL, "prompt": "x y z", "max_tokens": 2}
        )
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "echo: one two"}
    assert chat["choices"][0]["finish_reason"] == "stop"
    assert chat["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    body = text.json()
    assert body["choices"][0]["text"] == "echo: x"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 2


async def test_stream_with_usage_ends_like_vllm(standin_server: str) -> None:
    request = chat_body("a b c", stream=True, stream_options={"include_usage": True})
    async with httpx.AsyncClient(base_url=standin_server) as client:
        response = await client.post("/v1/chat/completions", json=request)
    events = sse_events(response.text)
    assert response.headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert content == "echo: a b c"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert all("usage" not in c for c in chunks[:-1])  # vLLM leaves it out (exclude_unset)


async def test_stream_with_continuous_usage_like_vllm(standin_server: str) -> None:
    options = {"include_usage": True, "continuous_usage_stats": True}
    request = chat_body("a b c", stream=True, stream_options=options)
    async with httpx.AsyncClient(base_url=standin_server) as client:
        response = await client.post("/v1/chat/completions", json=request)
    chunks = [json.loads(event) for event in sse_events(response.text)[:-1]]
    completions = [c["usage"]["completion_tokens"] for c in chunks]
    assert completions == [0, 1, 2, 3, 4, 4, 4]  # role, 4 tokens, finish, the final usage
    assert all(c["usage"]["prompt_tokens"] == 3 for c in chunks)


async def test_stream_without_usage_has_no_usage_chunk(standin_server: str) -> None:
    request = {"model": STANDIN_MODEL, "prompt": "p q", "stream": True}
    async with httpx.AsyncClient(base_url=standin_server) as client:
        response = await client.post("/v1/completions", json=request)
    events = sse_events(response.text)
    chunks = [json.loads(event) for event in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "echo: p q"
    assert all("usage" not in c and c["choices"] for c in chunks)


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/v1/chat/completions", chat_body("hi") | {"model": "nope"}, 404, "does not exist"),
        ("/v1/chat/completions", {"model": STANDIN_MODEL, "messages": []}, 400, "messages"),
        ("/v1/chat/completions", chat_body("hi", max_tokens=0), 400, "max_tokens"),
        ("/v1/chat/completions", chat_body("hi", n=2), 400, "n"),
        ("/v1/completions", {"model": STANDIN_MODEL}, 400, "prompt"),
        ("/v1/embeddings", {"model": STANDIN_MODEL, "input": 5}, 400, "input"),
        ("/v1/nothing", {}, 404, "no route"),
    ],
)
async def test_bad_requests_get_openai_errors(
    standin_server: str, path: str, body: dict[str, object], status: int, needle: str
) -> None:
    async with httpx.AsyncClient(base_url=standin_server) as client:
        response = await client.post(path, json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert needle in error["message"] and error["code"] == status


async def test_invalid_json_is_400(standin_server: str) -> None:
    async with httpx.AsyncClient(base_url=standin_server) as client:
        response = await client.post("/v1/chat/completions", content=b"{not json")
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "the request body is not valid JSON"


async def test_tokenize_counts_words(standin_server: str) -> None:
    async with httpx.AsyncClient(base_url=standin_server) as client:
        response = await client.post("/tokenize", json={"model": STANDIN_MODEL, "prompt": "a b a"})
    body = response.json()
    assert body["count"] == 3 and body["tokens"][0] == body["tokens"][2] != body["tokens"][1]


async def test_openai_client_works_unchanged(standin_server: str) -> None:
    client = openai.AsyncOpenAI(base_url=f"{standin_server}/v1", api_key="unused")
    async with client:
        models = await client.models.list()
        assert [model.id for model in models.data] == [STANDIN_MODEL]
        stream = await client.chat.completions.create(
            model=STANDIN_MODEL,
            messages=[{"role": "user", "content": "hello you"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces, usage = [], None
        async for chunk in stream:
            pieces += [choice.delta.content or "" for choice in chunk.choices]
            usage = chunk.usage or usage
        assert "".join(pieces) == "echo: hello you"
        assert usage is not None and usage.completion_tokens == 3
        embedded = await client.embeddings.create(model=STANDIN_MODEL, input=["a", "b"])
        assert [len(item.embedding) for item in embedded.data] == [EMBEDDING_DIM] * 2
        assert embedded.data[0].embedding == pytest.approx(embedding("a"), abs=1e-6)


async def test_api_key_is_required_when_configured(standin_factory: Factory) -> None:
    server = standin_factory(api_key="sekret")
    async with httpx.AsyncClient(base_url=server.url) as client:
        assert (await client.get("/health")).status_code == 200
        missing = await client.get("/v1/models")
        wrong = await client.get("/v1/models", headers={"Authorization": "Bearer nope"})
        right = await client.get("/v1/models", headers={"Authorization": "Bearer sekret"})
    assert missing.status_code == wrong.status_code == 401
    assert missing.json()["error"]["code"] == 401
    assert right.status_code == 200


async def test_tokens_arrive_one_by_one_and_gauges_follow(standin_factory: Factory) -> None:
    server = standin_factory(token_delay=0.05, max_running=1)
    request = chat_body("a b c d e f", stream=True)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:

        async def stream_one() -> list[str]:
            async with client.stream("POST", "/v1/chat/completions", json=request) as response:
                return [piece async for piece in response.aiter_text()]

        first = asyncio.create_task(stream_one())
        second = asyncio.create_task(stream_one())
        await asyncio.sleep(0.15)
        metrics = (await client.get("/metrics")).text
        pieces = await first
        await second
    assert f'vllm:num_requests_running{{model_name="{STANDIN_MODEL}"}} 1.0' in metrics
    assert f'vllm:num_requests_waiting{{model_name="{STANDIN_MODEL}"}} 1.0' in metrics
    assert len(pieces) > 3  # streamed in parts, not one buffered body


async def test_cancelled_stream_releases_its_slot(standin_factory: Factory) -> None:
    server = standin_factory(token_delay=0.05, max_running=1)
    request = chat_body(" ".join(["w"] * 100), stream=True)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        async with client.stream("POST", "/v1/chat/completions", json=request) as response:
            async for _ in response.aiter_text():
                break
        idle = f'vllm:num_requests_running{{model_name="{STANDIN_MODEL}"}} 0.0'
        async with asyncio.timeout(5):
            while True:
                if idle in (await client.get("/metrics")).text:
                    break
                await asyncio.sleep(0.05)
        done = await client.post("/v1/chat/completions", json=chat_body("ok"))
    assert done.status_code == 200


def test_sigterm_exits_cleanly(standin_factory: Factory) -> None:
    server = standin_factory()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=10) == 0
