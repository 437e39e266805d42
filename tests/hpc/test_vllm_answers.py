"""A real model (SmolLM2-135M-Instruct) in a real vLLM Slurm job answers through the router.

One job for the whole module (started by the agent, about a minute on 2 cores), then each
test asks something a random-weight model could never get right: a factual answer, streamed
and not; usage that counts exactly the tokens produced (one logprob entry per token); the
chat template with and without a system prompt; max_tokens and stop sequences. Greedy
decoding (temperature 0) keeps the answers the same from run to run.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from hpc.registry import Backend
from saia.sandbox.slurm import SlurmSandbox
from saia.sandbox.smollm2 import MODEL_NAME
from saia.sandbox.vllm import VllmInstall
from tests.hpc.helpers import until
from tests.hpc.test_vllm_slurm import (
    START_LIMIT,
    router_client,
    running_agent,
    sse_events,
    vllm_config,
)

pytestmark = [pytest.mark.vllm, pytest.mark.asyncio(loop_scope="module")]
SERVICE = MODEL_NAME
FRANCE = "What is the capital of France? Answer in one word."


@dataclass(frozen=True)
class Served:
    state_dir: Path
    backend: Backend


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(
    slurm_cluster: SlurmSandbox, vllm_install: VllmInstall, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Served]:
    state_dir = tmp_path_factory.mktemp("answers")
    prefix = "a" + uuid.uuid4().hex[:8]
    config = vllm_config(
        slurm_cluster,
        vllm_install,
        state_dir,
        prefix,
        name=SERVICE,
        model=str(vllm_install.chat_model_dir),
        vllm={"max_model_len": 2048, "dtype": "float32", "enforce_eager": True},
    )
    try:
        async with running_agent(config) as registry:
            ready = await until(lambda: registry.ready(SERVICE), START_LIMIT, "vLLM not ready")
            yield Served(state_dir, ready[0])
    finally:
        slurm_cluster.run(["scancel", f"--name={prefix}-{SERVICE}"])


async def ask(served: Served, body: dict[str, Any], path: str = "/v1/chat/completions") -> Any:
    async with router_client(served.state_dir, SERVICE) as router:
        status, answer = await router.request("POST", path, {"model": SERVICE, **body})
    assert status == 200, answer[:300]
    return json.loads(answer)


async def ask_streamed(served: Served, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The chunks of a streamed chat completion, usage included (the last chunk)."""
    request = {
        "model": SERVICE,
        "stream": True,
        "stream_options": {"include_usage": True},
        **body,
    }
    async with router_client(served.state_dir, SERVICE) as router:
        status, answer = await router.request("POST", "/v1/chat/completions", request)
    assert status == 200, answer[:300]
    events = sse_events(answer)
    assert events[-1] == "[DONE]"
    return [json.loads(event) for event in events[:-1]]


def user(text: str, **options: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], "temperature": 0, **options}


def logprob_entries(choice: dict[str, Any]) -> list[Any]:
    """A streamed choice's tokens (none in the role chunk and the finish chunk)."""
    return list((choice.get("logprobs") or {}).get("content") or [])


def streamed_text(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


async def test_a_factual_question_is_answered_streamed_and_not(served: Served) -> None:
    whole = await ask(served, user(FRANCE, max_tokens=20))
    text = whole["choices"][0]["message"]["content"]
    assert "Paris" in text, text
    assert whole["choices"][0]["finish_reason"] == "stop"  # the model ended its answer
    chunks = await ask_streamed(served, user(FRANCE, max_tokens=20))
    assert len([c for c in chunks if c["choices"]]) > 2  # token by token, not at once
    assert "Paris" in streamed_text(chunks)


async def test_usage_counts_exactly_the_tokens_produced(served: Served) -> None:
    """logprobs give one entry per generated token: the count usage must report."""
    question = "Name three colours of the rainbow."
    whole = await ask(served, user(question, max_tokens=24, logprobs=True))
    produced = whole["choices"][0]["logprobs"]["content"]
    assert whole["usage"]["completion_tokens"] == len(produced) > 0
    chunks = await ask_streamed(served, user(question, max_tokens=24, logprobs=True))
    streamed = [t for c in chunks if c["choices"] for t in logprob_entries(c["choices"][0])]
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == []
    assert usage["completion_tokens"] == len(streamed) == len(produced)
    assert usage["prompt_tokens"] == whole["usage"]["prompt_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


SYSTEM = "You are Saia, a helpful assistant. Always start your answer with: I am Saia."


async def test_the_chat_template_is_applied_with_the_system_prompt(served: Served) -> None:
    """vLLM renders the model's own template (its prompt tokens are what /tokenize counts
    for the same messages), and the model follows the system message."""
    question = {"role": "user", "content": "Who are you?"}
    for messages in ([{"role": "system", "content": SYSTEM}, question], [question]):
        counted = await ask(served, {"messages": messages}, path="/tokenize")
        answer = await ask(served, {"messages": messages, "temperature": 0, "max_tokens": 30})
        assert answer["usage"]["prompt_tokens"] == counted["count"]
        text = answer["choices"][0]["message"]["content"]
        assert ("Saia" in text) == (len(messages) == 2), text


async def test_max_tokens_and_stop_sequences_are_respected(served: Served) -> None:
    cut = await ask(served, user("Tell me a long story about a dragon.", max_tokens=7))
    assert cut["usage"]["completion_tokens"] == 7
    assert cut["choices"][0]["finish_reason"] == "length"
    counting = user("Count from 1 to 10, separated by commas.", max_tokens=60)
    full = (await ask(served, counting))["choices"][0]["message"]["content"]
    assert "4" in full and "6" in full, full
    stopped = await ask(served, {**counting, "stop": ["5"]})
    text = stopped["choices"][0]["message"]["content"]
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert "4" in text and "5" not in text and "6" not in text, text
    assert full.startswith(text)
