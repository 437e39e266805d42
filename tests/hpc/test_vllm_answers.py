"""A real model (SmolLM2-135M-Instruct) in a real vLLM Slurm job answers what a random one
could not.

The session's one SmolLM2 job (`smollm2_job`, tests/fixtures/vllm.py), asked directly with
its per-job key: a factual answer, streamed and not; usage that counts exactly the tokens
produced (one logprob entry per token); the chat template with and without a system prompt;
max_tokens and stop sequences. Greedy decoding (temperature 0) keeps the answers the same
from run to run. The whole chain to it is `saia demo --vllm` (tests/saia/test_demo.py).
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.fixtures.vllm import VllmJob

pytestmark = pytest.mark.vllm
FRANCE = "What is the capital of France? Answer in one word."


async def ask(job: VllmJob, body: dict[str, Any], path: str = "/v1/chat/completions") -> Any:
    headers = {"Authorization": f"Bearer {job.key}"}
    async with httpx.AsyncClient(
        base_url=job.url, trust_env=False, timeout=120, verify=job.verify
    ) as client:
        answer = await client.post(path, json={"model": job.model, **body}, headers=headers)
    assert answer.status_code == 200, answer.text[:300]
    return answer.json()


async def ask_streamed(job: VllmJob, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The chunks of a streamed chat completion, usage included (the last chunk)."""
    request = {"model": job.model, "stream": True, "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {job.key}"}
    async with (
        httpx.AsyncClient(
            base_url=job.url, trust_env=False, timeout=120, verify=job.verify
        ) as client,
        client.stream(
            "POST", "/v1/chat/completions", json={**request, **body}, headers=headers
        ) as answer,
    ):
        assert answer.status_code == 200
        events = [line[6:] async for line in answer.aiter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(event) for event in events[:-1]]


def user(text: str, **options: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], "temperature": 0, **options}


def logprob_entries(choice: dict[str, Any]) -> list[Any]:
    """A streamed choice's tokens (none in the role chunk and the finish chunk)."""
    return list((choice.get("logprobs") or {}).get("content") or [])


def streamed_text(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


async def test_a_factual_question_is_answered_streamed_and_not(smollm2_job: VllmJob) -> None:
    whole = await ask(smollm2_job, user(FRANCE, max_tokens=20))
    text = whole["choices"][0]["message"]["content"]
    assert "Paris" in text, text
    assert whole["choices"][0]["finish_reason"] == "stop"  # the model ended its answer
    chunks = await ask_streamed(smollm2_job, user(FRANCE, max_tokens=20))
    assert len([c for c in chunks if c["choices"]]) > 2  # token by token, not at once
    assert "Paris" in streamed_text(chunks)


async def test_usage_counts_exactly_the_tokens_produced(smollm2_job: VllmJob) -> None:
    """logprobs give one entry per generated token: the count usage must report."""
    question = "Name three colours of the rainbow."
    whole = await ask(smollm2_job, user(question, max_tokens=24, logprobs=True))
    produced = whole["choices"][0]["logprobs"]["content"]
    assert whole["usage"]["completion_tokens"] == len(produced) > 0
    chunks = await ask_streamed(smollm2_job, user(question, max_tokens=24, logprobs=True))
    streamed = [t for c in chunks if c["choices"] for t in logprob_entries(c["choices"][0])]
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == []
    assert usage["completion_tokens"] == len(streamed) == len(produced)
    assert usage["prompt_tokens"] == whole["usage"]["prompt_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


SYSTEM = "You are Saia, a helpful assistant. Always start your answer with: I am Saia."


async def test_the_chat_template_is_applied_with_the_system_prompt(smollm2_job: VllmJob) -> None:
    """vLLM renders the model's own template (its prompt tokens are what /tokenize counts
    for the same messages), and the model follows the system message."""
    question = {"role": "user", "content": "Who are you?"}
    for messages in ([{"role": "system", "content": SYSTEM}, question], [question]):
        counted = await ask(smollm2_job, {"messages": messages}, path="/tokenize")
        answer = await ask(smollm2_job, {"messages": messages, "temperature": 0, "max_tokens": 30})
        assert answer["usage"]["prompt_tokens"] == counted["count"]
        text = answer["choices"][0]["message"]["content"]
        assert ("Saia" in text) == (len(messages) == 2), text


async def test_max_tokens_and_stop_sequences_are_respected(smollm2_job: VllmJob) -> None:
    cut = await ask(smollm2_job, user("Tell me a long story about a dragon.", max_tokens=7))
    assert cut["usage"]["completion_tokens"] == 7
    assert cut["choices"][0]["finish_reason"] == "length"
    counting = user("Count from 1 to 10, separated by commas.", max_tokens=60)
    full = (await ask(smollm2_job, counting))["choices"][0]["message"]["content"]
    assert "4" in full and "6" in full, full
    stopped = await ask(smollm2_job, {**counting, "stop": ["5"]})
    text = stopped["choices"][0]["message"]["content"]
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert "4" in text and "5" not in text and "6" not in text, text
    assert full.startswith(text)
