"""Incremental reading of an upstream's SSE stream: find the usage chunk, strip it if asked.

The hub asks every streaming backend for usage (`stream_options.include_usage`) so it can
account tokens; a client that did not ask must not see the extra chunk. Complete events are
passed on at once; only an incomplete trailing event waits for its end. Events are parsed as
JSON only when they may carry usage or an error (a cheap byte search decides), so ordinary
token chunks are forwarded without decoding or re-encoding. With include_usage every chunk
carries `"usage":null` (OpenAI and vLLM alike): that is no usage, and no reason to parse.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_BOUNDARY = re.compile(rb"\r?\n\r?\n")


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def usage_of(payload: Any) -> Usage | None:
    """The usage of a decoded response or chunk, if it carries one."""
    if not isinstance(payload, dict):
        return None
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens")
    completion = usage.get("completion_tokens", 0)
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return Usage(prompt, completion or 0)


def usage_from_body(body: bytes) -> Usage | None:
    """The usage of a complete (non-streamed) JSON answer."""
    try:
        return usage_of(json.loads(body))
    except (ValueError, UnicodeDecodeError):
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
    except (ValueError, UnicodeDecodeError):
        return None


class UsageTap:
    """Watches one SSE stream; `feed` returns the bytes to forward to the client."""

    def __init__(self, *, strip_usage: bool) -> None:
        self._strip = strip_usage
        self._pending = b""
        self.usage: Usage | None = None
        self.error: str | None = None

    def feed(self, data: bytes) -> bytes:
        buffer = self._pending + data if self._pending else data
        end = _last_boundary(buffer)
        if end < 0:
            self._pending = buffer
            return b""
        complete, self._pending = buffer[:end], buffer[end:]
        if not may_matter(complete):
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
            if self._keep(event):
                out.append(event + separator)
        return b"".join(out)

    def _keep(self, event: bytes) -> bool:
        if not may_matter(event):
            return True
        payload = _event_json(event)
        if not isinstance(payload, dict):
            return True
        if payload.get("object") == "error" or "error" in payload:
            error = payload.get("error")
            message = error.get("message") if isinstance(error, dict) else None
            self.error = str(message or "upstream error")
            return True
        usage = usage_of(payload)
        if usage is None:
            return True
        self.usage = usage
        only_usage = not payload.get("choices") and not payload.get("data")
        return not (self._strip and only_usage)
