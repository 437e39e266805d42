"""The hub's hpc upstream over the real hop: hub (uvicorn) -> HopClient -> sshd with the
forced-command key -> relay -> the agent's router (in-process) -> stand-in server."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from hpc.config import AgentConfig, ServiceConfig
from hpc.registry import Backend, BackendRegistry
from hub.config import parse_config
from hub.upstreams.base import ModelState
from hub.upstreams.hpc import merge_states, site_order, sites_to_ask
from saia.sandbox.process import free_port
from saia.sandbox.sshd import SshdSandbox
from tests.fixtures.standin import StandinProcess
from tests.hpc.router.test_router_ssh import running_router
from tests.hub.helpers import ADMIN_TOKEN, running_hub

MODEL = "hpc-model"


def test_merge_states_prefers_the_best_site() -> None:
    reports = [
        [{"id": "a", "status": "loading", "demand": 0.0}, {"id": "b", "status": "offline"}],
        [{"id": "a", "status": "ready", "demand": 2.5}, {"id": "a2", "status": "bogus"}],
        [{"id": "a", "status": "ready", "demand": 0.5, "name": "A"}],
    ]
    assert merge_states(reports) == {
        "a": ModelState("ready", 0.5, "A"),
        "b": ModelState("offline", 0.0),
    }


def test_merge_states_sums_instances_over_sites() -> None:
    reports = [
        [{"id": "a", "status": "ready", "instances": 2, "starting": 0}],
        [{"id": "a", "status": "loading", "instances": 0, "starting": 1}],
        [{"id": "a", "status": "ready", "instances": True, "starting": -3}],  # not counts
    ]
    state = merge_states(reports)["a"]
    assert (state.status, state.instances, state.starting) == ("ready", 2, 1)


def test_merge_states_takes_the_soonest_predicted_wait() -> None:
    reports = [
        [{"id": "a", "status": "loading", "predicted_wait": 600}],
        [{"id": "a", "status": "loading", "predicted_wait": 95.0}],
        [
            {"id": "a", "status": "loading", "predicted_wait": True},
            {"id": "b", "status": "loading"},
        ],
    ]
    states = merge_states(reports)
    assert states["a"].predicted_wait == 95.0
    assert states["b"].predicted_wait is None  # no agent has an estimate
    bad = merge_states([[{"id": "a", "status": "loading", "predicted_wait": -5}]])
    assert bad["a"].predicted_wait is None


def test_sites_that_failed_recently_go_last() -> None:
    assert site_order([None, None, None], 100.0, 30.0) == [0, 1, 2]
    assert site_order([95.0, None, 50.0], 100.0, 30.0) == [1, 2, 0]
    assert site_order([95.0, 99.0], 100.0, 30.0) == [0, 1]  # all down: still tried


def test_sites_asked_for_state_skip_recent_failures() -> None:
    assert sites_to_ask([None, 98.0, 90.0], 100.0, 5.0) == [0, 2]
    assert sites_to_ask([99.0], 100.0, 5.0) == []


def hub_config(tmp_path: Path, sshd: SshdSandbox) -> Any:
    live = {
        "host": sshd.host, "port": sshd.port, "user": sshd.user,
        "client_key": str(sshd.client_key), "known_hosts": str(sshd.known_hosts),
    }  # fmt: skip
    dead = {**live, "port": free_port()}  # nothing listens: the hub must fail over
    return parse_config(
        {
            "data_dir": str(tmp_path / "hub-data"),
            "usage_flush_interval": 0.2,
            "upstreams": {
                "cluster": {
                    "kind": "hpc",
                    "sites": [dead, live],
                    "timeouts": {"connect": 2, "first_byte": 30, "idle": 30},
                    "services_ttl": 0,
                }
            },
            "models": [{"id": "public-name", "upstream": "cluster", "upstream_model": MODEL}],
        }
    )


@pytest.mark.ssh
async def test_hpc_models_chat_and_stream_with_failover(
    tmp_path: Path, sshd: SshdSandbox, standin_factory: Callable[..., StandinProcess]
) -> None:
    service = ServiceConfig(name=MODEL, model=MODEL, display_name="HPC Model")
    agent = AgentConfig(state_dir=sshd.state_dir, services=[service])
    registry = BackendRegistry()
    async with running_router(agent, registry), running_hub(hub_config(tmp_path, sshd)) as hub:
        key = await hub.create_key(owner="dora")
        async with hub.client(key) as http:
            models = (await http.get("/v1/models")).json()["data"]
            assert [(m["id"], m["status"]) for m in models] == [("public-name", "offline")]
            registry.publish(MODEL, [], starting=1)  # a job pending, Slurm's start known
            registry.publish_wait(MODEL, 300.0, time.monotonic())
            [loading] = (await http.get("/v1/models")).json()["data"]
            assert loading["status"] == "loading" and 290 <= loading["predicted_wait"] <= 300
            server = standin_factory(MODEL)
            registry.publish(MODEL, [Backend(MODEL, "job-1", server.url)])
            models = (await http.get("/v1/models")).json()["data"]
            assert models[0]["status"] == "ready"
            assert models[0]["name"] == "HPC Model"  # the agent's display name
            assert isinstance(models[0]["demand"], float)
            body = {
                "model": "public-name", "max_tokens": 3,
                "messages": [{"role": "user", "content": "alpha beta gamma delta"}],
            }  # fmt: skip
            answer = await http.post("/v1/chat/completions", json=body)
            assert answer.status_code == 200, answer.text
            usage = answer.json()["usage"]
            chunks = []
            async with http.stream(
                "POST", "/v1/chat/completions", json={**body, "stream": True}
            ) as stream:
                assert stream.status_code == 200
                async for line in stream.aiter_lines():
                    if line.startswith("data: {"):
                        chunks.append(json.loads(line[6:]))
        assert all(chunk["choices"] for chunk in chunks)  # usage chunk stripped
        summary = await _recorded(hub, 2)
        assert summary == [
            ("dora", 200, usage["prompt_tokens"], usage["completion_tokens"], False),
            ("dora", 200, usage["prompt_tokens"], usage["completion_tokens"], True),
        ]


@pytest.mark.ssh
async def test_admin_services_show_each_services_instances_from_the_agent(
    tmp_path: Path, sshd: SshdSandbox, standin_factory: Callable[..., StandinProcess]
) -> None:
    """The agent's listing carries ready instances and starting jobs over the hop into the
    hub's model state and /admin/services (the dashboard's services table)."""
    agent = AgentConfig(state_dir=sshd.state_dir, services=[ServiceConfig(name=MODEL, model=MODEL)])
    registry = BackendRegistry()
    async with running_router(agent, registry), running_hub(hub_config(tmp_path, sshd)) as hub:
        servers = [standin_factory(MODEL), standin_factory(MODEL)]
        backends = [Backend(MODEL, f"job-{i}", s.url) for i, s in enumerate(servers)]
        registry.publish(MODEL, backends, starting=1)
        admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
        async with hub.client() as http:
            listing = (await http.get("/admin/services", headers=admin)).json()
        assert [(s["id"], s["status"]) for s in listing] == [("public-name", "ready")]
        entry = listing[0]
        assert (entry["instances"], entry["starting"], entry["queued"]) == (2, 1, 0)
        assert entry["oldest_wait"] == 0.0 and entry["in_flight"] == 0


@pytest.mark.ssh
async def test_no_site_reachable_is_503(tmp_path: Path, sshd: SshdSandbox) -> None:
    config = hub_config(tmp_path, sshd)  # the router is not running: the relay fails
    sites = config.upstreams["cluster"].sites[:1]  # type: ignore[union-attr]
    cluster = config.upstreams["cluster"].model_copy(update={"sites": sites})
    config = config.model_copy(update={"upstreams": {"cluster": cluster}})
    async with running_hub(config) as hub, hub.client(await hub.create_key()) as http:
        body = {"model": "public-name", "prompt": "x"}
        response = await http.post("/v1/completions", json=body)
    assert response.status_code == 503 and response.headers["retry-after"] == "5"
    assert "reachable" in response.json()["error"]["message"]


async def _recorded(hub: Any, count: int) -> list[tuple[Any, ...]]:
    """Usage once `count` rows are written: a stream's row is queued as the hub's response
    ends, possibly just after the client read its last line (bounded poll)."""
    async with asyncio.timeout(10):
        while len(summary := await _flushed_usage(hub)) < count:  # noqa: ASYNC110 (the database signals nothing)
            await asyncio.sleep(0.05)
    return summary


async def _flushed_usage(hub: Any) -> list[tuple[Any, ...]]:
    await hub.services.recorder.flush()
    return await _usage(hub.services.engine)


async def _usage(engine: Any) -> list[tuple[Any, ...]]:
    from sqlalchemy import select

    from hub.storage import usage

    columns = (usage.c.user_name, usage.c.status, usage.c.prompt_tokens)
    statement = select(*columns, usage.c.completion_tokens, usage.c.stream).order_by(usage.c.id)
    async with engine.connect() as connection:
        return [tuple(row) for row in (await connection.execute(statement)).all()]


_ = httpx  # the hub's own client type is httpx


@pytest.mark.ssh
async def test_abandoned_hpc_streams_release_the_backend(
    tmp_path: Path, sshd: SshdSandbox, standin_factory: Callable[..., StandinProcess]
) -> None:
    agent = AgentConfig(state_dir=sshd.state_dir, services=[ServiceConfig(name=MODEL, model=MODEL)])
    registry = BackendRegistry()
    server = standin_factory(MODEL, token_delay=0.05)
    registry.publish(MODEL, [Backend(MODEL, "job-1", server.url)])
    words = " ".join(f"w{i}" for i in range(200))
    body = {"model": "public-name", "prompt": words, "max_tokens": 200, "stream": True}
    async with running_router(agent, registry), running_hub(hub_config(tmp_path, sshd)) as hub:
        async with hub.client(await hub.create_key()) as http:

            async def abandon() -> None:
                async with http.stream("POST", "/v1/completions", json=body) as response:
                    assert response.status_code == 200
                    async for _ in response.aiter_bytes():
                        assert registry.in_flight_of(MODEL, "job-1") >= 1
                        break  # one chunk, then the client goes away

            await asyncio.gather(*(abandon() for _ in range(10)))
        async with asyncio.timeout(10):
            # Polls state owned by the router and the hub (no event to wait on), bounded.
            while registry.in_flight_of(MODEL, "job-1"):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert hub.services.admission.in_flight == {}
        await hub.services.recorder.flush()
        statuses = [row[1] for row in await _usage(hub.services.engine)]
        assert statuses == [499] * 10
