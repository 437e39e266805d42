"""LoRA adapters (issue 13): a service declares adapters (model id -> path); its jobs load
them (vLLM's `--enable-lora --lora-modules`, which the stand-in reads too); each is listed
as its own model id and routed to its base service's backends with its own name as the
`model` the backend sees, which answers under that name."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from cloud_interface.relay import SOCKET_NAME
from hpc.config import AgentConfig, ConfigError, ServiceConfig, parse_config
from hpc.jobs.script import standin_args
from hpc.jobs.vllm_args import build_vllm_args
from hpc.registry import Backend, BackendRegistry
from hpc.router.server import serve_requests
from hpc.standin.model import lora_module
from saia.base import protocol as wire
from tests.fixtures.standin import StandinProcess
from tests.hpc.router.test_router import channel, frames_until_end, request

ADAPTERS = {"sql-lora": "/adapters/sql", "odd.lora": "/adapters/a=b,c"}


def service(**extra: Any) -> dict[str, Any]:
    return {"name": "llama", "model": "/models/llama", **extra}


def test_adapters_become_vllms_lora_flags_in_json() -> None:
    config = parse_config({"state_dir": "/s", "services": [service(adapters=ADAPTERS)]})
    args = build_vllm_args(config.services[0], config)
    start = args.index("--enable-lora")
    assert args[start : start + 4] == ["--enable-lora", "--max-loras", "2", "--lora-modules"]
    modules = [json.loads(entry) for entry in args[start + 4 : start + 6]]
    assert modules == [
        {"name": name, "path": path, "base_model_name": "llama"} for name, path in ADAPTERS.items()
    ]
    # the stand-in template passes the same flags, and reads each entry back as it was
    assert standin_args(config.services[0], config)[:6] == args[start : start + 6]
    assert [lora_module(entry) for entry in args[start + 4 : start + 6]] == list(ADAPTERS.items())
    assert lora_module("short=/p") == ("short", "/p")


def test_no_adapters_no_lora_flags() -> None:
    config = parse_config({"state_dir": "/s", "services": [service()]})
    assert "--enable-lora" not in build_vllm_args(config.services[0], config)


def test_an_adapter_id_maps_to_its_base_service() -> None:
    data = {"state_dir": "/s", "services": [service(adapters={"sql-lora": "/a"})]}
    config = parse_config(data)
    assert config.service("sql-lora") is config.services[0]
    assert config.service("other-lora") is None


@pytest.mark.parametrize(
    ("services", "expected"),
    [
        ([service(adapters={"llama": "/a"})], "service name 'llama' is used twice"),
        (
            [service(adapters={"x": "/a"}), service(name="m2", adapters={"x": "/b"})],
            "service name 'x' is used twice",
        ),
        ([service(adapters={"bad name": "/a"})], "use letters"),
    ],
)
def test_adapter_names_are_checked(services: list[dict[str, Any]], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        parse_config({"state_dir": "/s", "services": services})


@asynccontextmanager
async def router(tmp_path: Path, adapters: dict[str, str]) -> AsyncIterator[BackendRegistry]:
    """The router on `<tmp_path>/state/agent.sock`, serving `router-model` and its adapters."""
    base = ServiceConfig(name="router-model", model="router-model", adapters=adapters)
    config = AgentConfig(state_dir=tmp_path / "state", services=[base])
    registry = BackendRegistry()
    task = asyncio.create_task(serve_requests(config, registry))
    try:
        async with asyncio.timeout(10):
            while not (config.state_dir / SOCKET_NAME).exists():  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        yield registry
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def chat(model: str) -> bytes:
    messages = [{"role": "user", "content": "one two three"}]
    return json.dumps({"model": model, "max_tokens": 3, "messages": messages}).encode()


async def test_the_router_lists_and_routes_an_adapter_to_its_base_backends(
    tmp_path: Path, standin_factory: Callable[..., StandinProcess]
) -> None:
    """`router-model` (tests/hpc/router/test_router.py) with one adapter, on a stand-in that loads
    it: the listing has both ids, and a request for the adapter reaches the base's backend,
    which answers under the adapter's name."""
    server = standin_factory("router-model", extra_args=["--lora-modules", "sql-lora=/a"])
    async with router(tmp_path, {"sql-lora": "/a"}) as registry, channel(tmp_path) as chan:
        registry.publish("router-model", [Backend("router-model", "j", server.url)])
        head = wire.RequestHead("sql-lora", "POST", "/v1/chat/completions", [])
        request(chan, 1, head, chat("sql-lora"))
        request(chan, 3, wire.RequestHead("", "GET", "/v1/models", []), b"")
        request(chan, 5, wire.RequestHead("sql-lora", "GET", "/v1/models", []), b"")
        got = await frames_until_end(chan, 3)
    bodies = {s: b"".join(f.payload for f in got[s] if f.type == wire.DATA) for s in got}
    answer = json.loads(bodies[1])
    assert answer["model"] == "sql-lora"
    assert answer["usage"]["completion_tokens"] == 3
    listed = json.loads(bodies[3])["data"]
    assert [m["id"] for m in listed] == ["router-model", "sql-lora"]
    assert listed[1]["parent"] == "router-model"
    assert listed[1]["status"] == listed[0]["status"]  # the same backends serve it
    assert [m["id"] for m in json.loads(bodies[5])["data"]] == ["sql-lora"]
