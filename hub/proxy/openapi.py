"""The OpenAPI description of the proxied routes, which FastAPI does not route (HubApp answers
them before its routing): the request fields the hub itself reads, the rest passed on."""

from __future__ import annotations

from typing import Any

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
_MESSAGE = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {"role": {"type": "string"}, "content": {"type": "string"}},
}
_TEXTS = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
# What each endpoint needs besides `model`; other fields pass to the upstream as they are.
_FIELDS: dict[str, dict[str, Any]] = {
    "chat/completions": {"messages": {"type": "array", "items": _MESSAGE, "minItems": 1}},
    "completions": {"prompt": _TEXTS},
    "embeddings": {"input": _TEXTS},
    "responses": {"input": {"anyOf": [{"type": "string"}, {"type": "array"}]}},
    "messages": {
        "messages": {"type": "array", "items": _MESSAGE, "minItems": 1},
        "max_tokens": {"type": "integer", "minimum": 1},
    },
    "rerank": {"query": {"type": "string"}, "documents": _TEXTS},
    "score": {"text_1": _TEXTS, "text_2": _TEXTS},
    "audio/transcriptions": {"file": {"type": "string", "format": "binary"}},
    "audio/translations": {"file": {"type": "string", "format": "binary"}},
    "audio/speech": {"input": {"type": "string"}},
    "tokenize": {"prompt": {"type": "string"}},
    "detokenize": {"tokens": {"type": "array", "items": {"type": "integer"}}},
}
_STREAMING = {
    "stream": {"type": ["boolean", "null"]},
    "stream_options": {
        "type": ["object", "null"],
        "properties": {
            "include_usage": {"type": ["boolean", "null"]},
            "continuous_usage_stats": {"type": ["boolean", "null"]},
        },
    },
    "max_tokens": {"type": "integer", "minimum": 1},
}


def proxied_operation(endpoint: str) -> dict[str, Any]:
    fields = dict(_FIELDS[endpoint])
    if endpoint in ("chat/completions", "completions"):
        fields.update(_STREAMING)
    elif endpoint in ("responses", "messages"):
        fields["stream"] = _STREAMING["stream"]
    body = {
        "type": "object",
        "required": ["model", *_FIELDS[endpoint]],
        "properties": {"model": {"type": "string"}, **fields},
    }
    error = {
        "description": "an error in OpenAI's shape",
        "content": {"application/json": {"schema": ERROR_SCHEMA}},
    }
    answer = {"description": "the upstream's answer (an event stream when `stream` is true)"}
    return {
        "tags": ["openai"],
        "summary": f"{endpoint} (passed to the model's upstream)",
        "operationId": f"proxied_{endpoint.replace('/', '_')}",
        "requestBody": {"required": True, "content": {_media(endpoint): {"schema": body}}},
        "responses": {"200": answer, "4XX": error, "5XX": error},
    }


def _media(endpoint: str) -> str:
    """Audio uploads are multipart forms (model and file fields); the rest JSON."""
    multipart = endpoint in ("audio/transcriptions", "audio/translations")
    return "multipart/form-data" if multipart else "application/json"


def add_proxied_paths(schema: dict[str, Any], paths: dict[str, str]) -> None:
    """Document each proxied path (route -> path: hub.endpoints.ROUTES) in an OpenAPI schema,
    in place."""
    for endpoint, path in paths.items():
        schema.setdefault("paths", {})[path] = {"post": proxied_operation(endpoint)}
