"""Incremental reading of an upstream's SSE stream: find usage, strip what was not asked.

The hub asks every streaming upstream for usage (`stream_options.include_usage`), and an
upstream that can (vLLM's `continuous_usage_stats`) for usage on every chunk, so that a
client that leaves mid-stream is charged what was generated up to then. A client sees only
the usage it asked for. Complete events are passed on at once; only an incomplete trailing
event waits for its end. Events are parsed as JSON only when they may carry usage or an
error (a cheap byte search decides), so ordinary token chunks are forwarded without decoding
or re-encoding. `"usage":null` (OpenAI's chunks with include_usage) is no usage.

An upstream that never reports usage still costs: every content event counts one
completion token (`UsageTap.estimate`). The Responses API's and Anthropic's streams report
usage only at their start (Anthropic's message_start: the prompt) and end: a client that
leaves mid-way pays one completion token per output delta event received since the last
usage seen (`response.*.delta`, `content_block_delta`), by the same estimator, not one per
event of any kind, and never nothing for a long answer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

# What usage a client asked to see in a stream: none, the final usage chunk, or also usage
# on every chunk (vLLM's continuous_usage_stats).
UsageWish = Literal["none", "final", "all"]
_BOUNDARY = re.compile(rb"\r?\n\r?\n")
# vLLM's per-chunk usage: a flat object after the choices, e.g. ,"usage":{"prompt_tokens":..}
_FLAT_USAGE = re.compile(rb',\s*"usage"\s*:\s*(\{[^{}]*\})')
_TOKEN_COUNT = re.compile(rb'"(prompt_tokens|completion_tokens)"\s*:\s*([0-9]{1,15})[,}\s]')


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def usage_of(payload: Any) -> Usage | None:
    """The usage of a decoded response or chunk, if it carries one: OpenAI's (prompt and
    completion tokens), or the Responses API's and Anthropic's (input and output tokens,
    also inside a Responses event's `response` or a message_start's `message`)."""
    if not isinstance(payload, dict):
        return None
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        inner = payload.get("response") or payload.get("message")
        usage = inner.get("usage") if isinstance(inner, dict) else None
        if not isinstance(usage, dict):
            return None
    if usage.get("type") == "duration":  # a transcription: seconds of audio, as prompt
        prompt, completion = usage.get("seconds"), 0
    elif "prompt_tokens" in usage:
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens", 0)
    else:
        prompt, completion = _input_tokens(usage), usage.get("output_tokens", 0)
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return Usage(prompt, completion or 0)


def _input_tokens(usage: dict[str, Any]) -> int | None:
    """Input tokens in the Responses API's or Anthropic's usage. Anthropic counts cached
    input apart (cache reads and writes); all of it was the prompt. A message_delta that
    gives output tokens only has no input figure: 0 (the tap keeps message_start's)."""
    total = usage.get("input_tokens", 0 if "output_tokens" in usage else None)
    if not isinstance(total, int):
        return None
    for name in ("cache_read_input_tokens", "cache_creation_input_tokens"):
        extra = usage.get(name)
        if isinstance(extra, int) and not isinstance(extra, bool):
            total += extra
    return total


def usage_from_body(body: bytes) -> Usage | None:
    """The usage of a complete (non-streamed) JSON answer."""
    try:
        return usage_of(json.loads(body))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


def may_matter(data: bytes) -> bool:
    """Whether events may carry a usage object or an error (else they pass as they are).

    A `"usage"` or `"error"` token outside a JSON string is always a key or a value (quotes
    inside strings are escaped), so a byte search cannot miss one.
    """
    usages = data.count(b'"usage"')
    if usages:
        usages -= data.count(b'"usage":null') + data.count(b'"usage": null')
    return usages > 0 or b'"error"' in data


def _last_boundary(buffer: bytes) -> int:
    """Index just after the last complete event in buffer, or -1."""
    lf = buffer.rfind(b"\n\n")
    crlf = buffer.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else -1, crlf + 4 if crlf >= 0 else -1)


def _event_json(event: bytes) -> Any:
    data = [line[5:].strip() for line in event.splitlines() if line.startswith(b"data:")]
    if not data:
        return None
    try:
        return json.loads(b"\n".join(data))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


def _count_deltas(complete: bytes) -> int:
    """Output delta events of the Responses API (`"type":"response.output_text.delta"`, and
    reasoning or function-call argument deltas) and Anthropic's (`content_block_delta`).
    The quoted names can only be JSON values: inside a string, the quotes are escaped."""
    return complete.count(b'.delta"') + complete.count(b'"content_block_delta"')


def _count_events(complete: bytes) -> int:
    """Data events in complete events, [DONE] aside (a newline inside JSON is escaped, so a
    line that starts with `data:` is always an event's)."""
    events = complete.count(b"\ndata:") + complete.startswith(b"data:")
    return events - complete.count(b"data: [DONE]") - complete.count(b"data:[DONE]")


class UsageTap:
    """Watches one SSE stream; `feed` returns the bytes to forward to the client."""

    def __init__(self, show: UsageWish) -> None:
        self._show = show
        self._pending = b""
        self.usage: Usage | None = None
        self.error: str | None = None
        self.events = 0
        self.deltas = 0  # output delta events since the last usage seen

    @property
    def estimate(self) -> Usage:
        """The usage reported last plus one completion token per output delta event since
        (a Responses or Messages stream cut before its final usage); with no usage at all,
        one completion token per delta event, else per event seen."""
        usage = self.usage
        if usage is None:
            return Usage(0, self.deltas or self.events)
        if self.deltas:
            return Usage(usage.prompt_tokens, usage.completion_tokens + self.deltas)
        return usage

    def feed(self, data: bytes) -> bytes:
        buffer = self._pending + data if self._pending else data
        end = _last_boundary(buffer)
        if end < 0:
            self._pending = buffer
            return b""
        complete, self._pending = buffer[:end], buffer[end:]
        if self.usage is None:
            self.events += _count_events(complete)
        if not may_matter(complete):
            self.deltas += _count_deltas(complete)
            return complete
        return self._scan(complete)

    def flush(self) -> bytes:
        """What is left at the end of the stream (an unterminated last event)."""
        rest, self._pending = self._pending, b""
        return rest

    def _scan(self, complete: bytes) -> bytes:
        out: list[bytes] = []
        pieces = _BOUNDARY.split(complete)
        separators = _BOUNDARY.findall(complete)
        for event, separator in zip(pieces, separators, strict=False):
            self.deltas += _count_deltas(event)  # before its usage, which covers it
            kept = self._pass(event)
            if kept is not None:
                out.append(kept + separator)
        return b"".join(out)

    def _pass(self, event: bytes) -> bytes | None:
        """The event as the client gets it (None: not at all)."""
        if not may_matter(event):
            return event
        quick = self._token_chunk(event)
        if quick is not None:
            return quick
        payload = _event_json(event)
        if not isinstance(payload, dict):
            return event
        if payload.get("object") == "error" or "error" in payload:
            error = payload.get("error")
            message = error.get("message") if isinstance(error, dict) else None
            self.error = str(message or "upstream error")
            return event
        usage = usage_of(payload)
        if usage is None:
            return event
        if self.usage is not None and usage.prompt_tokens == 0:
            # Anthropic's message_delta may give output tokens only: the input stays.
            usage = Usage(self.usage.prompt_tokens, usage.completion_tokens)
        self.usage, self.deltas = usage, 0
        if self._show == "all":
            return event
        if not payload.get("choices") and not payload.get("data"):
            return event if self._show == "final" else None  # the final usage chunk
        del payload["usage"]  # usage on a token chunk, which only "all" shows
        return b"data: " + json.dumps(payload, separators=(",", ":")).encode()

    def _token_chunk(self, event: bytes) -> bytes | None:
        """A token chunk with per-chunk usage, read and stripped without decoding the chunk
        (a fifth of the cost of a parse and re-encode, on every token); None when the
        event is not plainly one (it is parsed then). One `"usage"` in the bytes is the
        key: a string "usage" would be a second one, and a quote in a string is escaped."""
        if event.count(b'"usage"') != 1 or b'"error"' in event or b'"choices":[{' not in event:
            return None
        match = _FLAT_USAGE.search(event)
        if match is None:
            return None
        counts = dict(_TOKEN_COUNT.findall(match[1]))
        if b"prompt_tokens" not in counts:
            return None
        self.usage = Usage(int(counts[b"prompt_tokens"]), int(counts.get(b"completion_tokens", 0)))
        self.deltas = 0
        return event if self._show == "all" else event[: match.start()] + event[match.end() :]
