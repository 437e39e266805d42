"""A Responses (/v1/responses) or Anthropic Messages (/v1/messages) stream that the client
leaves mid-way is charged like a cut chat stream: one completion token per output delta
event received (on top of the usage the stream gave so far: Messages' prompt tokens at
message_start), not one per event of any kind, and never nothing for a long answer.

The tap on the stand-in's own event shapes (exact figures), then through a real hub with
the stand-in as upstream, the client going away after a few deltas.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from hpc.standin.shapes import ResponsesRequest, anthropic_usage, event, responses_text_events
from hub.proxy.sse import Usage, UsageTap
from tests.hub.helpers import hub_config, running_hub
from tests.hub.test_api import recorded_rows

WORDS = [f"w{i}" for i in range(30)]


def responses_stream(tokens: list[str], prompt_tokens: int) -> list[bytes]:
    body = ResponsesRequest.model_validate({"model": "m", "input": "x", "stream": True})
    return responses_text_events(body, "resp_1234", 0, 100, (tokens, "stop", prompt_tokens))


def messages_stream(tokens: list[str], prompt_tokens: int) -> list[bytes]:
    """The stand-in's Messages events (vLLM's order), as `hpc.standin.apis` sends them."""
    message = {"id": "m1", "type": "message", "usage": anthropic_usage(prompt_tokens, 0)}
    events = [event("message_start", {"type": "message_start", "message": message})]
    start = {"type": "content_block_start", "index": 0, "content_block": {"type": "text"}}
    events.append(event("content_block_start", start))
    for word in tokens:
        delta = {"type": "content_block_delta", "index": 0, "delta": {"text": f" {word}"}}
        events.append(event("content_block_delta", delta))
    events.append(event("content_block_stop", {"type": "content_block_stop", "index": 0}))
    done = {"type": "message_delta", "usage": anthropic_usage(prompt_tokens, len(tokens))}
    events += [event("message_delta", done), event("message_stop", {"type": "message_stop"})]
    return events


def tapped(events: list[bytes], pieces: int = 1) -> UsageTap:
    """The tap fed the events, `pieces` events per chunk (upstream reads coalesce)."""
    tap = UsageTap("all")
    for at in range(0, len(events), pieces):
        tap.feed(b"".join(events[at : at + pieces]))
    return tap


@pytest.mark.parametrize("pieces", [1, 3, 100])
def test_a_cut_responses_stream_counts_its_deltas(pieces: int) -> None:
    events = responses_stream(WORDS, 7)
    # response.created, in_progress, output_item.added, content_part.added, then deltas
    assert sum(b"response.output_text.delta" in e for e in events[:4]) == 0
    cut = tapped(events[: 4 + 10], pieces)
    assert cut.estimate == Usage(0, 10)  # was one per event: 14
    whole = tapped(events, pieces)
    assert whole.estimate == Usage(7, 30)  # the usage of response.completed, exactly


@pytest.mark.parametrize("pieces", [1, 3, 100])
def test_a_cut_messages_stream_counts_its_deltas_after_the_prompt(pieces: int) -> None:
    events = messages_stream(WORDS, 7)
    cut = tapped(events[: 2 + 10], pieces)
    assert cut.estimate == Usage(7, 10)  # was message_start's usage: 0 completion tokens
    whole = tapped(events, pieces)
    assert whole.estimate == Usage(7, 30)  # message_delta's final usage, exactly


def test_chat_streams_count_as_before() -> None:
    chunk = b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n'
    tap = UsageTap("none")
    tap.feed(chunk * 5)
    assert tap.estimate == Usage(0, 5)  # no usage: one token per event
    usage = b'"usage":{"prompt_tokens":3,"completion_tokens":6}'
    usage = b'data: {"choices":[{"delta":{"content":"x"}}],' + usage + b"}\n\n"
    tap.feed(usage)
    tap.feed(chunk)  # a chunk after per-chunk usage: its own usage comes with the next
    assert tap.estimate == Usage(3, 6)


async def _leave_after_deltas(
    http: httpx.AsyncClient, path: str, body: dict[str, Any], deltas: int
) -> int:
    """Read the stream until `deltas` output delta events arrived, then go away."""
    seen = 0
    async with http.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: ") and (".delta" in line or "content_block_delta" in line):
                seen += 1
                if seen >= deltas:
                    break
    return seen


@pytest.mark.parametrize("api", ["responses", "messages"])
async def test_a_client_leaving_a_responses_or_messages_stream_pays_its_deltas(
    tmp_path: Path, standin_factory: Any, api: str
) -> None:
    slow = standin_factory("slow", token_delay=0.1)
    config = hub_config(tmp_path, slow.url, "slow")
    prompt = " ".join(WORDS)  # the stand-in echoes the prompt: 30 tokens of answer
    if api == "responses":
        path = "/v1/responses"
        body = {"model": "slow", "input": prompt, "max_output_tokens": 30, "stream": True}
    else:
        path = "/v1/messages"
        message = {"role": "user", "content": prompt}
        body = {"model": "slow", "max_tokens": 30, "messages": [message], "stream": True}
    async with running_hub(config) as hub, hub.client(await hub.create_key()) as http:
        seen = await _leave_after_deltas(http, path, body, 5)
        row = (await recorded_rows(hub, 1))[0]
    assert seen == 5 and row["status"] == 499 and row["stream"]
    completion = int(str(row["completion_tokens"]))
    # What the client got, and at most a delta or two the hub read before it noticed the
    # client had gone; one per event would add the four events before the first delta.
    assert 5 <= completion <= 7, completion
    # Messages tell the prompt at their start; the Responses API only at its end.
    assert row["prompt_tokens"] == (30 if api == "messages" else 0)
