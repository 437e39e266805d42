"""Request models and answer shapes of the stand-in's Responses, Messages, rerank and score
endpoints (pure), after vLLM 0.32's protocol classes."""

from __future__ import annotations

import json
from typing import Any

from pydantic import Field

from hpc.standin.model import ApiError, _Loose

AUDIO_BYTES_PER_SECOND = 32000  # 16 kHz, 16-bit mono PCM


class ResponsesRequest(_Loose):
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    stream: bool = False


class AnthropicMessage(_Loose):
    role: str
    content: str | list[dict[str, Any]]


class MessagesRequest(_Loose):
    model: str
    messages: list[AnthropicMessage] = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    system: str | list[dict[str, Any]] | None = None
    stream: bool = False


class RerankRequest(_Loose):
    model: str
    query: str
    documents: str | list[str]
    top_n: int = Field(0, ge=0)


class ScoreRequest(_Loose):
    """vLLM's score request forms: text_1/text_2, data_1/data_2, queries/documents|items."""

    model: str
    text_1: str | list[str] | None = None
    text_2: str | list[str] | None = None
    data_1: str | list[str] | None = None
    data_2: str | list[str] | None = None
    queries: str | list[str] | None = None
    documents: str | list[str] | None = None
    items: str | list[str] | None = None

    def pairs(self) -> list[tuple[str, str]]:
        """One pair per score: one left side against many, or pairwise."""
        for left, right in (
            (self.text_1, self.text_2),
            (self.data_1, self.data_2),
            (self.queries, self.documents),
            (self.queries, self.items),
        ):
            if left is not None and right is not None:
                lefts = [left] if isinstance(left, str) else left
                rights = [right] if isinstance(right, str) else right
                if len(lefts) == 1:
                    return [(lefts[0], r) for r in rights]
                if len(lefts) != len(rights):
                    raise ApiError(400, "the two sides of a score request differ in length")
                return list(zip(lefts, rights, strict=True))
        raise ApiError(400, "give text_1 and text_2 (or queries and documents)", "text_1")


def text_of_blocks(content: str | list[dict[str, Any]]) -> str:
    """The text of a message's content: a string, or text blocks (others are skipped)."""
    if isinstance(content, str):
        return content
    texts = [block.get("text") for block in content if isinstance(block, dict)]
    return " ".join(t for t in texts if isinstance(t, str) and t)


def text_of_input(value: str | list[dict[str, Any]]) -> str:
    """The text of a Responses `input`: a string, or items whose content is text."""
    if isinstance(value, str):
        return value
    parts = []
    for item in value:
        content = item.get("content")
        if isinstance(content, str | list):
            parts.append(text_of_blocks(content))
    return " ".join(p for p in parts if p)


def anthropic_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"input_tokens": prompt_tokens, "output_tokens": completion_tokens}


def responses_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {
            "cached_tokens": 0,
            "cache_write_tokens": 0,
            "input_tokens_per_turn": [],
            "cached_tokens_per_turn": [],
        },
        "output_tokens": completion_tokens,
        "output_tokens_details": {
            "reasoning_tokens": 0,
            "tool_output_tokens": 0,
            "output_tokens_per_turn": [],
            "tool_output_tokens_per_turn": [],
        },
        "total_tokens": prompt_tokens + completion_tokens,
    }


Generated = tuple[list[str], str, int]  # tokens, finish reason, prompt tokens


def message_item(ident: str, text: str, status: str) -> dict[str, Any]:
    content: list[dict[str, Any]] = [
        {"type": "output_text", "text": text, "annotations": [], "logprobs": None}
    ]
    return {
        "id": ident,
        "content": content if text else [],
        "role": "assistant",
        "status": status,
        "type": "message",
    }


def response_object(
    body: ResponsesRequest, ident: str, created: int, limit: int, generated: Generated | None
) -> dict[str, Any]:
    """vLLM's ResponsesResponse: in progress (`generated` None) or done."""
    done = generated is not None
    tokens, finish, prompt_tokens = generated or ([], "", 0)
    incomplete = done and finish == "length"
    output = [message_item(f"msg_{ident[5:]}", " ".join(tokens), "completed")] if done else []
    return {
        "id": ident, "created_at": created,
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "instructions": body.instructions, "metadata": None, "model": body.model,
        "object": "response", "output": output, "parallel_tool_calls": True,
        "temperature": 1.0, "tool_choice": "auto", "tools": [], "top_p": 1.0,
        "background": False, "max_output_tokens": limit, "max_tool_calls": None,
        "previous_response_id": None, "prompt": None, "reasoning": None,
        "service_tier": "auto",
        "status": ("incomplete" if incomplete else "completed") if done else "in_progress",
        "text": None, "top_logprobs": None, "truncation": "disabled",
        "usage": responses_usage(prompt_tokens, len(tokens)) if done else None,
        "user": None,
    }  # fmt: skip


def responses_text_events(
    body: ResponsesRequest, ident: str, created: int, limit: int, generated: Generated
) -> list[bytes]:
    """vLLM's simple (non-harmony) event stream of a text answer, numbered in order."""
    tokens = generated[0]
    item_id = f"msg_{ident[5:]}"
    text = " ".join(tokens)
    start = response_object(body, ident, created, limit, None)
    where = {"output_index": 0, "item_id": item_id, "content_index": 0}
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": start},
        {"type": "response.in_progress", "response": start},
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": message_item(item_id, "", "in_progress"),
        },
        {"type": "response.content_part.added", **where, "part": part},
    ]
    for index, word in enumerate(tokens):
        delta = word if index == 0 else f" {word}"
        events.append(
            {"type": "response.output_text.delta", **where, "delta": delta, "logprobs": []}
        )
    done_part = {**part, "text": text, "logprobs": None}
    events += [
        {"type": "response.output_text.done", **where, "text": text, "logprobs": []},
        {"type": "response.content_part.done", **where, "part": done_part},
        {
            "type": "response.output_item.done",
            "output_index": 0,
            "item": message_item(item_id, text, "completed"),
        },
        {
            "type": "response.completed",
            "response": response_object(body, ident, created, limit, generated),
        },
    ]
    return [event(e["type"], {**e, "sequence_number": n}) for n, e in enumerate(events)]


def event(name: str, data: dict[str, Any]) -> bytes:
    """One SSE event with its `event:` line, as vLLM's Responses and Messages streams."""
    text = json.dumps(data, separators=(",", ":"))
    return f"event: {name}\ndata: {text}\n\n".encode()
