"""The stand-in model server's request shapes and its deterministic "model" (pure).

One token per word; the answer echoes the prompt, so tests can predict every reply.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

EMBEDDING_DIM = 32
MAX_MODEL_LEN = 4096


# -- requests -------------------------------------------------------------------------
class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow")


class ContentPart(_Loose):
    type: str
    text: str | None = None


class Message(_Loose):
    role: str
    content: str | list[ContentPart] | None = None


class StreamOptions(_Loose):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage on every chunk (with include_usage)


class GenerationRequest(_Loose):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1


class ChatRequest(GenerationRequest):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(GenerationRequest):
    prompt: str | list[str]


class EmbeddingRequest(_Loose):
    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"


class TokenizeRequest(_Loose):
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


# -- the deterministic "model" --------------------------------------------------------
def words_of(text: str) -> list[str]:
    return text.split()


def chat_prompt(messages: list[Message]) -> str:
    parts: list[str] = []
    for message in messages:
        if isinstance(message.content, str):
            parts.append(message.content)
        elif message.content:
            parts += [part.text for part in message.content if part.text]
    return " ".join(parts)


def reply_tokens(prompt: str, max_tokens: int) -> tuple[list[str], str]:
    """The answer's tokens (an echo of the prompt's words) and its finish reason."""
    natural = ["echo:", *words_of(prompt)]
    if max_tokens < len(natural):
        return natural[:max_tokens], "length"
    return natural, "stop"


def token_id(word: str) -> int:
    return int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "big") % 32000


def embedding(text: str) -> list[float]:
    """A deterministic unit vector of EMBEDDING_DIM floats for the text."""
    digest = hashlib.sha256(text.encode()).digest()  # 32 bytes, one per dimension
    raw = [(byte - 127.5) / 127.5 for byte in digest[:EMBEDDING_DIM]]
    norm = math.sqrt(sum(value * value for value in raw)) or 1.0
    return [value / norm for value in raw]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def completion(
    ident: str, model: str, chat: bool, tokens: list[str], finish: str, prompt_tokens: int
) -> dict[str, Any]:
    """A whole (not streamed) chat or text completion as vLLM answers it: the server's
    and `run-batch`'s."""
    text = " ".join(tokens)
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {
        "id": ident,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage(prompt_tokens, len(tokens)),
    }


@dataclass(frozen=True)
class StreamShape:
    """What every SSE chunk of one stream looks like (chat or text, with usage or not)."""

    ident: str
    model: str
    chat: bool
    include_usage: bool
    created: int
    continuous_usage: bool = False

    def progress(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        """The usage so far, which vLLM puts on every chunk with continuous_usage_stats."""
        if not self.continuous_usage:
            return {}
        return {"usage": usage(prompt_tokens, completion_tokens)}

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        data: dict[str, Any] = {
            "id": self.ident,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        return sse({**data, **extra})  # no "usage" key unless given (vLLM: exclude_unset)

    def piece(self, text: str | None, reason: str | None) -> dict[str, Any]:
        """One choice: new text (None: nothing, as in the closing chunk) and a finish reason."""
        out: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": reason}
        if self.chat:
            out["delta"] = {} if text is None else {"content": text}
        else:
            out["text"] = text or ""
        return out

    def role(self) -> dict[str, Any]:
        """The opening choice of a chat stream."""
        return {**self.piece(None, None), "delta": {"role": "assistant", "content": ""}}


def sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def lora_module(text: str) -> tuple[str, str]:
    """One `--lora-modules` entry as vLLM 0.32 reads it: JSON, else `name=path`."""
    if "=" in text and "," not in text:
        name, path = text.split("=", 1)
        return name, path
    try:
        entry = json.loads(text)
        return str(entry["name"]), str(entry["path"])
    except (ValueError, KeyError, TypeError) as error:
        raise argparse.ArgumentTypeError(f"not name=path nor JSON: {text!r}") from error
