"""One definition of the endpoints (saia/base/endpoints.py) that both ends speak: the hub
proxies exactly the paths the agent's router forwards, each named alike on both sides."""

from __future__ import annotations

from typing import get_args

from hpc.config import TASK_ENDPOINTS
from hpc.router.forwarding import FORWARDED_ENDPOINTS
from hub.endpoints import DEFAULT_ENDPOINTS, ROUTES, endpoint_name
from saia.base.endpoints import ENDPOINT_PATHS, Endpoint


def test_every_endpoint_has_a_path_and_every_path_one_endpoint() -> None:
    assert set(ENDPOINT_PATHS.values()) == set(get_args(Endpoint))
    served = {name for names in TASK_ENDPOINTS.values() for name in names}
    assert served | set(DEFAULT_ENDPOINTS) <= set(get_args(Endpoint))


def test_the_hub_proxies_what_the_router_forwards_under_the_same_names() -> None:
    assert set(ROUTES.values()) == {path for _, path in FORWARDED_ENDPOINTS}
    for route, path in ROUTES.items():
        assert FORWARDED_ENDPOINTS["POST", path] == endpoint_name(route)


def test_routes_are_paths_without_v1() -> None:
    assert ROUTES["chat/completions"] == "/v1/chat/completions"
    assert ROUTES["audio/transcriptions"] == "/v1/audio/transcriptions"
    assert ROUTES["detokenize"] == "/detokenize"
    assert endpoint_name("detokenize") == "tokenize"
    assert endpoint_name("chat/completions") == "chat"
