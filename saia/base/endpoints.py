"""The endpoints a model serves, named as the agent's config, the hub's config and /v1/models
name them, and the HTTP path of each (the same on the hub, the agent's router and vLLM): one
definition both ends speak, since the hub and the agent share only saia.base."""

from __future__ import annotations

from typing import Literal

Endpoint = Literal[
    "chat",
    "completions",
    "embeddings",
    "responses",
    "messages",
    "rerank",
    "score",
    "transcriptions",
    "translations",
    "speech",
    "tokenize",
]
# Every path passed through to a model's server (always POST) and the endpoint it belongs
# to: what the hub proxies and the router's allow-list. audio/speech only reaches a backend
# that serves it (vLLM 0.32 does not).
ENDPOINT_PATHS: dict[str, Endpoint] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "responses",
    "/v1/messages": "messages",
    "/v1/rerank": "rerank",
    "/v1/score": "score",
    "/v1/audio/transcriptions": "transcriptions",
    "/v1/audio/translations": "translations",
    "/v1/audio/speech": "speech",
    "/tokenize": "tokenize",
    "/detokenize": "tokenize",
}
