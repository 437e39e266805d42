"""The scheduler's predicted wait of a cold service at the router's seam: Retry-After of
the 503 a request gets when no instance became ready in time, and `predicted_wait` in
/v1/models while the service is loading. The agent's side (published from the snapshot)
is in test_agent_loop.py; the pure prediction in test_capacity.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from hpc.config import AgentConfig, RouterConfig, ServiceConfig
from hpc.registry import Backend, BackendRegistry
from hpc.router.forwarding import RETRY_AFTER_NOT_READY, Forwarder, Rejection
from hpc.router.server import Router
from saia.base.http11 import HttpClient
from saia.base.protocol import RequestHead

MODEL = "cold-model"
SERVICE = ServiceConfig(name=MODEL, model=MODEL, min_instances=0)
HEAD = RequestHead(MODEL, "POST", "/v1/chat/completions", [("content-type", "application/json")])
BODY = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode()


class NoSink:
    """The request never reaches a backend: nothing may be sent."""

    def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        raise AssertionError("no backend answered")

    async def send(self, data: bytes) -> None:
        raise AssertionError("no backend answered")

    def finish(self) -> None:
        raise AssertionError("no backend answered")

    def fail(self, status: int, code: str, message: str) -> None:
        raise AssertionError("no backend answered")


async def rejection(registry: BackendRegistry) -> Rejection:
    async with HttpClient(connect_timeout=2.0) as http:
        forwarder = Forwarder(http, registry, RouterConfig(queue_timeout=0))
        with pytest.raises(Rejection) as rejected:
            await forwarder.forward(NoSink(), SERVICE, HEAD, BODY)
    return rejected.value


@pytest.mark.parametrize(
    ("predicted", "retry_after"),
    [(95.4, "95"), (0.0, "1"), (5000.0, "300"), (None, RETRY_AFTER_NOT_READY)],
)
async def test_a_cold_service_is_refused_with_the_predicted_wait(
    predicted: float | None, retry_after: str
) -> None:
    registry = BackendRegistry()
    registry.publish(MODEL, [], starting=1)
    registry.publish_wait(MODEL, predicted, time.monotonic())
    refused = await rejection(registry)
    assert (refused.status, refused.code, refused.retry_after) == (
        503,
        "model_loading",
        retry_after,
    )
    if predicted is not None:
        assert f"expected in about {retry_after} s" in str(refused)


def test_the_predicted_wait_shrinks_as_time_passes() -> None:
    registry = BackendRegistry()
    assert registry.predicted_wait(MODEL, 100.0) is None
    registry.publish_wait(MODEL, 60.0, 100.0)
    assert registry.predicted_wait(MODEL, 130.0) == 30.0
    assert registry.predicted_wait(MODEL, 500.0) == 0.0
    registry.publish_wait(MODEL, None, 500.0)
    assert registry.predicted_wait(MODEL, 500.0) is None


async def test_models_lists_the_predicted_wait_of_a_loading_service(tmp_path: Path) -> None:
    config = AgentConfig(state_dir=tmp_path, services=[SERVICE])
    registry = BackendRegistry()
    async with HttpClient(connect_timeout=2.0) as http:
        router = Router(lambda: config, registry, Forwarder(http, registry, RouterConfig()))

        def listed() -> dict[str, object]:
            [entry] = json.loads(router.listing(MODEL))["data"]
            assert isinstance(entry, dict)
            return entry

        registry.publish_wait(MODEL, 240.0, time.monotonic())
        assert listed()["status"] == "offline" and "predicted_wait" not in listed()
        registry.publish(MODEL, [], starting=1)
        entry = listed()
        assert entry["status"] == "loading" and entry["predicted_wait"] in (239, 240)
        registry.publish_wait(MODEL, None, time.monotonic())
        assert "predicted_wait" not in listed()  # Slurm has no estimate: none claimed
        registry.publish(MODEL, [Backend(MODEL, "1", "http://127.0.0.1:1")])
        registry.publish_wait(MODEL, 0.0, time.monotonic())
        assert listed()["status"] == "ready" and "predicted_wait" not in listed()
