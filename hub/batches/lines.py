"""The lines of batch files (pure): input checked line by line as it arrives, output sorted.

Input lines are OpenAI's batch request lines, `{"custom_id", "method": "POST", "url",
"body": {"model", ...}}`, one JSON object a line; every line of a file names the same model
and endpoint (as OpenAI requires). Output lines are vLLM's `run-batch` lines
`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

BATCH_URLS = ("/v1/chat/completions", "/v1/embeddings")  # what `vllm run-batch` serves
MAX_CUSTOM_ID = 512


class LineError(ValueError):
    """A line that is not a valid batch request; str() names the line."""


@dataclass(frozen=True)
class InputSummary:
    lines: int
    model: str | None
    url: str | None


class LineChecker:
    """Feed chunks of a JSONL file; raises LineError at the first bad line.

    Holds at most one line (up to `max_line_bytes`) and the set of custom ids seen.
    `model_error(model)` says why a model may not be used (None: it may).
    """

    def __init__(
        self, max_line_bytes: int, max_requests: int, model_error: Callable[[str], str | None]
    ) -> None:
        self._max_line, self._max_requests = max_line_bytes, max_requests
        self._model_error = model_error
        self._carry = bytearray()
        self._number = 0  # lines seen, blank ones too (the numbers a text editor shows)
        self._requests = 0
        self._ids: set[str] = set()
        self.model: str | None = None
        self.url: str | None = None

    def feed(self, data: bytes) -> None:
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            self._carry += data[start:end]
            start = end + 1
            self._line(bytes(self._carry))
            self._carry.clear()
        self._carry += data[start:]
        if len(self._carry) > self._max_line:
            self._fail(self._number + 1, f"is longer than {self._max_line} bytes")

    def finish(self) -> InputSummary:
        if self._carry:
            self._line(bytes(self._carry))
            self._carry.clear()
        if self._requests == 0:
            raise LineError("the file has no request lines")
        return InputSummary(self._requests, self.model, self.url)

    def _fail(self, number: int, reason: str) -> NoReturn:
        raise LineError(f"line {number} {reason}")

    def _line(self, raw: bytes) -> None:
        self._number += 1
        if len(raw) > self._max_line:
            self._fail(self._number, f"is longer than {self._max_line} bytes")
        if not raw.strip():
            return
        try:
            line = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            self._fail(self._number, "is not JSON (the file must be JSONL: one object a line)")
        if not isinstance(line, dict):
            self._fail(self._number, "is not a JSON object")
        self._requests += 1
        if self._requests > self._max_requests:
            self._fail(self._number, f"is past the limit of {self._max_requests} requests")
        self._check(self._number, line)

    def _check(self, number: int, line: dict[str, Any]) -> None:
        custom_id, body = line.get("custom_id"), line.get("body")
        if not isinstance(custom_id, str) or not 0 < len(custom_id) <= MAX_CUSTOM_ID:
            self._fail(number, f"needs a custom_id string (1-{MAX_CUSTOM_ID} characters)")
        if custom_id in self._ids:
            self._fail(number, f"repeats the custom_id {custom_id[:80]!r}")
        self._ids.add(custom_id)
        if line.get("method") != "POST":
            self._fail(number, 'needs "method": "POST"')
        url = line.get("url")
        if url not in BATCH_URLS:
            self._fail(number, f"has url {str(url)[:80]!r}; use one of {', '.join(BATCH_URLS)}")
        if self.url is not None and url != self.url:
            self._fail(number, f"has url {url}, but line 1 has {self.url}: one endpoint a file")
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            self._fail(number, "needs a body object naming its model")
        model = body["model"]
        if self.model is not None and model != self.model:
            self._fail(number, f"names model {model[:80]!r}, but earlier lines {self.model!r}")
        if self.model is None:
            reason = self._model_error(model)
            if reason is not None:
                self._fail(number, reason)
        if body.get("stream"):
            self._fail(number, "asks for a stream, which a batch cannot give")
        self.url, self.model = url, model


@dataclass(frozen=True)
class OutputLine:
    """What the hub takes from one output line: where it goes and its tokens."""

    custom_id: str
    ok: bool  # a 200 answer (output file) or not (error file)
    prompt_tokens: int
    completion_tokens: int


def _tokens(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def read_output_line(raw: bytes) -> OutputLine | None:
    """The verdict on one output line; None for a line that is not an output object."""
    try:
        line = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str):
        return None
    custom_id, response = line["custom_id"], line.get("response")
    if not isinstance(response, dict) or line.get("error"):
        return OutputLine(custom_id, False, 0, 0)
    body = response.get("body")
    usage = body.get("usage") if isinstance(body, dict) else None
    usage = usage if isinstance(usage, dict) else {}
    ok = response.get("status_code") == 200 and isinstance(body, dict)
    prompt, completion = (
        _tokens(usage.get("prompt_tokens")),
        _tokens(usage.get("completion_tokens")),
    )
    return OutputLine(custom_id, ok, prompt, completion)


def renamed_line(raw: bytes, field_path: tuple[str, ...], old: str, new: str) -> bytes:
    """The line with the string at `field_path` replaced when it is `old` (a model renamed
    between the public id and the upstream's name); other lines unchanged."""
    try:
        line = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return raw
    node = line
    for key in field_path[:-1]:
        node = node.get(key) if isinstance(node, dict) else None
    if not isinstance(node, dict) or node.get(field_path[-1]) != old:
        return raw
    node[field_path[-1]] = new
    return json.dumps(line, separators=(",", ":")).encode()


def final_status(agent_state: str, cancel_asked: bool, expired: bool) -> str:
    """The batch's last status from how its job ended (pure)."""
    if agent_state == "completed":
        return "completed"
    if expired:
        return "expired"
    if cancel_asked or agent_state == "cancelled":
        return "cancelled"
    return "failed"


def missing_line(custom_id: str, batch_id: str, message: str) -> bytes:
    """An error-file line for a request the failed job never answered."""
    line = {
        "id": f"{batch_id}-missing", "custom_id": custom_id, "response": None,
        "error": {"code": "batch_failed", "message": message},
    }  # fmt: skip
    return json.dumps(line, separators=(",", ":")).encode()


def custom_id_of(raw: bytes) -> str | None:
    try:
        line = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    value = line.get("custom_id") if isinstance(line, dict) else None
    return value if isinstance(value, str) else None
