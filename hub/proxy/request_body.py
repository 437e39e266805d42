"""The client's request body: read, checked, and rewritten into the body the upstream gets.

Checks are about what would let a request through uncounted: `stream` and `stream_options`
must be what the hub reads them as (vLLM's pydantic models read 1 and "true" as true; a hub
that read them as false would let a stream pass unmetered), so anything but a JSON boolean
(or null) is refused, and so is JSON too deeply nested to decode.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from hub.config import ModelConfig
from hub.errors import ApiError
from hub.proxy.hooks import apply_hooks
from hub.proxy.sse import UsageWish

_USAGE_OPTIONS = ("include_usage", "continuous_usage_stats")
NESTED_TOO_DEEPLY = "the request body is nested too deeply"
# Endpoints whose streams report usage only when asked (stream_options.include_usage).
USAGE_OPTION_STREAMS = ("chat/completions", "completions")


@dataclass(frozen=True)
class UpstreamBody:
    body: bytes | AsyncIterable[bytes]  # pieces: an upload that streams on (audio)
    stream: bool
    usage_wish: UsageWish


async def read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"request body larger than {limit} bytes", code="body_too_large")
    parts: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body larger than {limit} bytes", code="body_too_large")
        parts.append(chunk)
    return b"".join(parts)


def parse_request(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, NESTED_TOO_DEEPLY, code="invalid_json") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "`model` is required", param="model", code="missing_model")
    return payload


def _flag(value: Any) -> bool:
    return value is None or isinstance(value, bool)


def _check_streaming(payload: dict[str, Any]) -> None:
    if not _flag(payload.get("stream")):
        raise ApiError(400, "`stream` must be true or false", param="stream", code="invalid_type")
    options = payload.get("stream_options")
    if options is None:
        return
    if not isinstance(options, dict):
        message = "`stream_options` must be an object"
        raise ApiError(400, message, param="stream_options", code="invalid_type")
    for name in _USAGE_OPTIONS:
        if not _flag(options.get(name)):
            param = f"stream_options.{name}"
            message = f"`{param}` must be true or false"
            raise ApiError(400, message, param=param, code="invalid_type")


def rewrite(
    payload: dict[str, Any], body: bytes, model: ModelConfig, endpoint: str, per_chunk: bool
) -> UpstreamBody:
    """The upstream's body: hooks applied, the upstream's model name, and for a stream the
    usage the hub needs (on every chunk when the upstream can: `per_chunk`)."""
    rewritten = apply_hooks(payload, model.hooks, endpoint)
    rewritten["model"] = model.target
    _check_streaming(rewritten)
    if rewritten.get("stream") is True:
        if endpoint not in USAGE_OPTION_STREAMS:
            # The Responses and Messages streams always end with their usage, and have no
            # stream_options: the client's body passes as for a whole answer.
            return UpstreamBody(_same_or_encoded(payload, rewritten, body), True, "all")
        rewritten, wish = ask_for_usage(rewritten, per_chunk)
        return UpstreamBody(_encode(rewritten), True, wish)
    return UpstreamBody(_same_or_encoded(payload, rewritten, body), False, "none")


def _same_or_encoded(payload: dict[str, Any], rewritten: dict[str, Any], body: bytes) -> bytes:
    if rewritten == payload and _one_model_key(body):
        return body  # nothing changed: the client's bytes
    return _encode(rewritten)


def ask_for_usage(payload: dict[str, Any], per_chunk: bool) -> tuple[dict[str, Any], UsageWish]:
    """The body asking a streaming upstream for usage, and what the client asked itself."""
    options = payload.get("stream_options") or {}
    wish: UsageWish = "none"
    if options.get("include_usage") is True:
        wish = "all" if options.get("continuous_usage_stats") is True else "final"
    merged = {**options, "include_usage": True}
    if per_chunk:
        merged["continuous_usage_stats"] = True
    return {**payload, "stream_options": merged}, wish


def _encode(payload: dict[str, Any]) -> bytes:
    try:
        return json.dumps(payload, separators=(",", ":")).encode()
    except RecursionError:  # decoded just below the limit, but encoded deeper in the stack
        raise ApiError(400, NESTED_TOO_DEEPLY, code="invalid_json") from None


def _one_model_key(body: bytes) -> bool:
    """Whether `model` is spelled once and plainly, so that the upstream cannot read another
    model than the hub checked (JSON parsers differ on duplicate keys). A quote inside a
    string is escaped, so `"model"` in the bytes is a key or a value; only a \\u escape
    could spell it otherwise."""
    return body.count(b'"model"') == 1 and b"\\u" not in body
