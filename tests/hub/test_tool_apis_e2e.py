"""The APIs of coding agents and tool pipelines through the real chain (hub -> sshd forced
command -> relay -> agent -> Slurm jobs of the stand-in), with the unchanged official SDKs:
the `openai` SDK's Responses API, the `anthropic` SDK's Messages API (its key as
`x-api-key`), rerank and score with httpx. Each usage row matches the backend's counts.
The live catalog: a service added to the agent by reload is served with no hub change."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
import yaml
from sqlalchemy import select

from hpc.standin.shapes import AUDIO_BYTES_PER_SECOND
from hub.storage import open_engine, usage
from saia.sandbox.slurm import SlurmSandbox
from tests.faults.chain import FaultChain, running

pytestmark = [pytest.mark.e2e, pytest.mark.slurm, pytest.mark.ssh]

FAST = ["--token-delay", "0.001"]
SERVICES: list[dict[str, Any]] = [
    {"name": "coder", "server_args": FAST, "adapters": {"coder-sql": "/adapters/sql"}},
    {"name": "ranker", "server_args": FAST, "vllm": {"task": "score"}},
    {"name": "listener", "server_args": FAST, "vllm": {"task": "transcription"}},
]
ROW_WAIT = 10.0  # the hub writes usage every 0.2 s


@pytest.fixture(scope="module")
def chain(
    slurm_cluster: SlurmSandbox, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FaultChain]:
    chain = FaultChain(tmp_path_factory.mktemp("apis"), slurm_cluster, SERVICES, keys=1)
    with running(chain):
        yield chain


async def usage_row(chain: FaultChain, request_id: str) -> dict[str, Any]:
    """The hub's usage row of one request (bounded wait for the writer)."""
    engine = open_engine(f"sqlite+aiosqlite:///{chain.root / 'hub-data' / 'hub.db'}")
    query = select(usage).where(usage.c.request_id == request_id)
    try:
        async with asyncio.timeout(ROW_WAIT):
            while True:
                async with engine.connect() as connection:
                    row = (await connection.execute(query)).mappings().first()
                if row is not None:
                    return dict(row)
                await asyncio.sleep(0.2)
    finally:
        await engine.dispose()


def counts(row: dict[str, Any]) -> tuple[int, int]:
    return row["prompt_tokens"], row["completion_tokens"]


async def test_responses_api_with_the_openai_sdk(chain: FaultChain) -> None:
    client = openai.AsyncOpenAI(base_url=f"{chain.hub_url}/v1", api_key=chain.keys[0])
    raw = await client.responses.with_raw_response.create(model="coder", input="write a test")
    answer = raw.parse()
    assert answer.output_text == "echo: write a test" and answer.model == "coder"
    assert answer.usage is not None
    row = await usage_row(chain, raw.headers["x-request-id"])
    assert counts(row) == (answer.usage.input_tokens, answer.usage.output_tokens) == (3, 4)
    assert (row["endpoint"], row["stream"], row["status"]) == ("responses", False, 200)

    raw_stream = await client.responses.with_raw_response.create(
        model="coder", input="stream it please", stream=True
    )
    deltas, final = [], None
    async for event in raw_stream.parse():
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        elif event.type == "response.completed":
            final = event.response
    assert "".join(deltas) == "echo: stream it please"
    assert final is not None and final.usage is not None
    row = await usage_row(chain, raw_stream.headers["x-request-id"])
    assert counts(row) == (final.usage.input_tokens, final.usage.output_tokens) == (3, 4)
    assert (row["endpoint"], row["stream"], row["status"]) == ("responses", True, 200)


async def test_messages_api_with_the_anthropic_sdk(chain: FaultChain) -> None:
    client = anthropic.AsyncAnthropic(base_url=chain.hub_url, api_key=chain.keys[0])
    messages: list[anthropic.types.MessageParam] = [{"role": "user", "content": "fix the bug"}]
    raw = await client.messages.with_raw_response.create(
        model="coder", max_tokens=32, system="you code", messages=messages
    )
    answer = await raw.parse()
    assert answer.content[0].type == "text"
    assert answer.content[0].text == "echo: you code fix the bug"
    row = await usage_row(chain, raw.headers["x-request-id"])
    assert counts(row) == (answer.usage.input_tokens, answer.usage.output_tokens) == (5, 6)
    assert (row["endpoint"], row["stream"]) == ("messages", False)

    async with client.messages.stream(model="coder", max_tokens=3, messages=messages) as stream:
        text = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()
        request_id = stream.response.headers["x-request-id"]
    assert text == "echo: fix the" and final.stop_reason == "max_tokens"
    row = await usage_row(chain, request_id)
    assert counts(row) == (final.usage.input_tokens, final.usage.output_tokens) == (3, 3)
    assert (row["endpoint"], row["stream"]) == ("messages", True)


async def test_messages_errors_in_anthropics_shape(chain: FaultChain) -> None:
    client = anthropic.AsyncAnthropic(base_url=chain.hub_url, api_key="not-a-key")
    messages: list[anthropic.types.MessageParam] = [{"role": "user", "content": "hi"}]
    with pytest.raises(anthropic.AuthenticationError) as refused:
        await client.messages.create(model="coder", max_tokens=4, messages=messages)
    assert refused.value.body is not None
    assert refused.value.response.json()["type"] == "error"
    good = anthropic.AsyncAnthropic(base_url=chain.hub_url, api_key=chain.keys[0])
    with pytest.raises(anthropic.NotFoundError) as missing:
        await good.messages.create(model="no-such-model", max_tokens=4, messages=messages)
    assert missing.value.response.json()["error"]["type"] == "not_found_error"


async def test_rerank_and_score_with_httpx(chain: FaultChain) -> None:
    headers = {"authorization": f"Bearer {chain.keys[0]}"}
    docs = ["the cat sat", "a dog ran far", "fish"]
    async with httpx.AsyncClient(base_url=chain.hub_url, headers=headers, timeout=30) as http:
        rerank = await http.post(
            "/v1/rerank", json={"model": "ranker", "query": "cat", "documents": docs}
        )
        score = await http.post(
            "/v1/score", json={"model": "ranker", "text_1": "cat", "text_2": docs}
        )
    assert rerank.status_code == 200, rerank.text
    assert len(rerank.json()["results"]) == 3
    row = await usage_row(chain, rerank.headers["x-request-id"])
    assert counts(row) == (rerank.json()["usage"]["prompt_tokens"], 0) == (11, 0)
    assert score.status_code == 200, score.text
    assert [d["index"] for d in score.json()["data"]] == [0, 1, 2]
    row = await usage_row(chain, score.headers["x-request-id"])
    assert counts(row) == (score.json()["usage"]["prompt_tokens"], 0) == (11, 0)


async def test_audio_transcription_with_the_openai_sdk(chain: FaultChain) -> None:
    client = openai.AsyncOpenAI(base_url=f"{chain.hub_url}/v1", api_key=chain.keys[0])
    audio = b"RIFF" + bytes(2 * AUDIO_BYTES_PER_SECOND)  # two seconds of 16 kHz PCM
    raw = await client.audio.transcriptions.with_raw_response.create(
        model="listener", file=("speech.wav", audio, "audio/wav")
    )
    assert raw.parse().text == f"transcribed {len(audio)} bytes of audio"
    row = await usage_row(chain, raw.headers["x-request-id"])
    # vLLM reports a transcription's usage as seconds of audio: counted as prompt tokens.
    assert counts(row) == (2, 0) and row["endpoint"] == "audio/transcriptions"
    with pytest.raises(openai.NotFoundError, match="does not serve /v1/audio/transcriptions"):
        await client.audio.transcriptions.create(model="coder", file=("a.wav", audio))


async def test_an_endpoint_a_service_does_not_serve_is_a_clear_404(chain: FaultChain) -> None:
    headers = {"authorization": f"Bearer {chain.keys[0]}"}
    async with httpx.AsyncClient(base_url=chain.hub_url, headers=headers, timeout=30) as http:
        rerank = await http.post(
            "/v1/rerank", json={"model": "coder", "query": "q", "documents": ["d"]}
        )
        responses = await http.post("/v1/responses", json={"model": "ranker", "input": "hi"})
        models = (await http.get("/v1/models")).json()["data"]
    assert rerank.status_code == 404, rerank.text
    error = rerank.json()["error"]
    assert error["code"] == "endpoint_not_served"
    assert "does not serve /v1/rerank" in error["message"] and "responses" in error["message"]
    assert responses.status_code == 404 and "it serves: rerank, score" in responses.text
    served = {m["id"]: m["endpoints"] for m in models}
    assert served == {
        "coder": ["chat", "completions", "responses", "messages", "tokenize"],
        "coder-sql": ["chat", "completions", "responses", "messages", "tokenize"],
        "ranker": ["rerank", "score", "tokenize"],
        "listener": ["transcriptions", "translations"],
    }


def reload_agent(chain: FaultChain, services: list[dict[str, Any]]) -> None:
    """Rewrite the agent's config with these services and `saia hpc reload` it."""
    path = chain.root / "agent.yaml"
    config = yaml.safe_load(path.read_text())
    config["services"] = services
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    argv = [sys.executable, "-m", "saia", "hpc", "reload", "-c", str(path)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr


async def listed(http: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    return {m["id"]: m for m in (await http.get("/v1/models")).json()["data"]}


async def poll(
    done: Callable[[dict[str, dict[str, Any]]], bool], http: httpx.AsyncClient, limit: float
) -> None:
    """Until `done` holds for the hub's /v1/models (bounded by `limit` seconds)."""
    async with asyncio.timeout(limit):
        while True:
            if done(await listed(http)):
                return
            await asyncio.sleep(0.1)


async def test_a_service_added_by_reload_is_served_without_a_hub_change(
    chain: FaultChain,
) -> None:
    """Added to the agent's config and reloaded: the hub lists it within one observation
    cycle (poll_interval 0.5 s) and serves it under its own name; removed: it leaves."""
    hub_config = (chain.root / "hub.yaml").read_bytes()
    added = {**chain.services[0], "name": "newcomer", "model": "newcomer", "adapters": {}}
    headers = {"authorization": f"Bearer {chain.keys[0]}"}
    async with httpx.AsyncClient(base_url=chain.hub_url, headers=headers, timeout=30) as http:
        assert "newcomer" not in await listed(http)
        reload_agent(chain, [*chain.services, added])
        # The reload is applied at the agent's next loop (poll_interval 0.5 s).
        await poll(lambda models: "newcomer" in models, http, 2.0)
        models = await listed(http)
        assert models["newcomer"]["endpoints"][:2] == ["chat", "completions"]
        # Its first Slurm job starts the stand-in.
        await poll(lambda models: models["newcomer"]["status"] == "ready", http, 60.0)
        body = {"model": "newcomer", "messages": [{"role": "user", "content": "hello there"}]}
        answer = await http.post("/v1/chat/completions", json=body)
        assert answer.status_code == 200, answer.text
        row = await usage_row(chain, answer.headers["x-request-id"])
        assert (row["model"], *counts(row)) == ("newcomer", 2, 3)
        reload_agent(chain, chain.services)
        await poll(lambda models: "newcomer" not in models, http, 2.0)
        gone = await http.post("/v1/chat/completions", json=body)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    assert (chain.root / "hub.yaml").read_bytes() == hub_config


async def test_a_lora_adapter_is_its_own_model_served_by_its_base(chain: FaultChain) -> None:
    """`coder-sql`, an adapter of `coder`: listed by the hub, answered by coder's job under
    the adapter's name (the stand-in loads it from --lora-modules as vLLM does), and its
    usage row is its own."""
    client = openai.AsyncOpenAI(base_url=f"{chain.hub_url}/v1", api_key=chain.keys[0])
    assert {"coder", "coder-sql"} <= {model.id async for model in client.models.list()}
    raw = await client.chat.completions.with_raw_response.create(
        model="coder-sql", messages=[{"role": "user", "content": "select all"}], max_tokens=2
    )
    answer = raw.parse()
    assert answer.model == "coder-sql" and answer.usage is not None
    assert answer.choices[0].message.content == "echo: select"
    row = await usage_row(chain, raw.headers["x-request-id"])
    assert (row["model"], *counts(row)) == ("coder-sql", answer.usage.prompt_tokens, 2)
    jobs = {job.service for job in await chain.jobs()}
    assert "coder-sql" not in jobs  # no job of its own: the base's serve it
