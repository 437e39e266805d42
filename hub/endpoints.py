"""The hub's view of the endpoints a model serves (saia/base/endpoints.py): its proxied
routes, named as its usage records and error messages name them, and the endpoints an
openai upstream's model serves by default."""

from __future__ import annotations

from saia.base.endpoints import ENDPOINT_PATHS, Endpoint

__all__ = ["DEFAULT_ENDPOINTS", "ROUTES", "Endpoint", "endpoint_name"]

# What a model of an openai upstream is taken to serve when the config does not say.
DEFAULT_ENDPOINTS: tuple[Endpoint, ...] = ("chat", "completions", "embeddings", "responses")
# Route -> path of every proxied path; a route is the path without its /v1/ (chat/completions,
# audio/transcriptions, detokenize), the `endpoint` of a usage record.
ROUTES: dict[str, str] = {
    path.removeprefix("/v1/").removeprefix("/"): path for path in ENDPOINT_PATHS
}


def endpoint_name(route: str) -> Endpoint:
    """The endpoint a proxied route belongs to: chat/completions is chat,
    audio/transcriptions is transcriptions, detokenize is tokenize."""
    return ENDPOINT_PATHS[ROUTES[route]]
