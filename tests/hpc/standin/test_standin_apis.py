"""The stand-in's Responses, Messages, rerank, score and audio endpoints, read by the
official SDKs (which parse vLLM's shapes) and httpx, on a real stand-in subprocess."""

from __future__ import annotations

import anthropic
import httpx
import openai

from hpc.standin.apis import similarity
from hpc.standin.shapes import AUDIO_BYTES_PER_SECOND
from tests.fixtures.standin import STANDIN_MODEL


async def test_responses_whole_and_streamed(standin_server: str) -> None:
    client = openai.AsyncOpenAI(base_url=f"{standin_server}/v1", api_key="x")
    answer = await client.responses.create(model=STANDIN_MODEL, input="one two three")
    assert answer.output_text == "echo: one two three"
    assert answer.status == "completed"
    assert answer.usage is not None
    assert (answer.usage.input_tokens, answer.usage.output_tokens) == (3, 4)
    cut = await client.responses.create(model=STANDIN_MODEL, input="a b c", max_output_tokens=2)
    assert cut.status == "incomplete" and cut.output_text == "echo: a"
    kinds, deltas = [], []
    stream = await client.responses.create(model=STANDIN_MODEL, input="x y", stream=True)
    async for event in stream:
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        if event.type == "response.completed":
            assert event.response.usage is not None
            assert event.response.usage.output_tokens == 3
    assert "".join(deltas) == "echo: x y"
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"


async def test_anthropic_messages_whole_and_streamed(standin_server: str) -> None:
    client = anthropic.AsyncAnthropic(base_url=standin_server, api_key="x")
    messages: list[anthropic.types.MessageParam] = [{"role": "user", "content": "hi there"}]
    answer = await client.messages.create(
        model=STANDIN_MODEL, max_tokens=16, system="be brief", messages=messages
    )
    assert answer.content[0].type == "text" and answer.content[0].text == "echo: be brief hi there"
    assert (answer.usage.input_tokens, answer.usage.output_tokens) == (4, 5)
    assert answer.stop_reason == "end_turn"
    async with client.messages.stream(
        model=STANDIN_MODEL, max_tokens=2, messages=messages
    ) as stream:
        text = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "echo: hi"
    assert final.stop_reason == "max_tokens"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (2, 2)


async def test_rerank_score_and_audio(standin_server: str) -> None:
    async with httpx.AsyncClient(base_url=standin_server) as client:
        docs = ["cats purr", "dogs bark", "fish swim"]
        rerank = await client.post(
            "/v1/rerank",
            json={"model": STANDIN_MODEL, "query": "cats", "documents": docs, "top_n": 2},
        )
        score = await client.post(
            "/v1/score", json={"model": STANDIN_MODEL, "text_1": "cats", "text_2": docs}
        )
        audio = b"\0" * (3 * AUDIO_BYTES_PER_SECOND)
        files = {"file": ("a.wav", audio, "audio/wav")}
        heard = await client.post(
            "/v1/audio/transcriptions", data={"model": STANDIN_MODEL}, files=files
        )
    ranked = rerank.json()
    assert len(ranked["results"]) == 2 and ranked["usage"]["prompt_tokens"] == 9
    best = max(docs, key=lambda d: similarity("cats", d))
    assert ranked["results"][0]["document"]["text"] == best
    scored = score.json()
    assert [d["score"] for d in scored["data"]] == [similarity("cats", d) for d in docs]
    assert scored["usage"] == {"prompt_tokens": 9, "total_tokens": 9, "completion_tokens": 0}
    assert heard.json() == {
        "text": f"transcribed {len(audio)} bytes of audio",
        "usage": {"type": "duration", "seconds": 3},
    }
