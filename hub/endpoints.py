"""The names of the endpoints a model serves, as the agent's config and /v1/models spell
them (the same names as `hpc.config.Endpoint`; the hub does not import the agent)."""

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
# What a model of an openai upstream is taken to serve when the config does not say.
DEFAULT_ENDPOINTS: tuple[Endpoint, ...] = ("chat", "completions", "embeddings", "responses")


def endpoint_name(endpoint: str) -> str:
    """The name of a proxied endpoint (its path after /v1/): chat/completions is chat,
    audio/transcriptions is transcriptions, detokenize is tokenize."""
    if endpoint == "chat/completions":
        return "chat"
    if endpoint == "detokenize":
        return "tokenize"
    return endpoint.rsplit("/", 1)[-1]
