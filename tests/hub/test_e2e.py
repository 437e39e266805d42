"""The whole chain with real components: the hub (uvicorn) -> HopClient -> sshd with the
forced-command key -> relay -> the agent (in-process, leader, router) -> a Slurm job on the
sandbox cluster running the stand-in model server."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hub.config import parse_config
from saia.sandbox.slurm import SlurmSandbox
from saia.sandbox.sshd import SshdSandbox
from tests.hpc.scheduler.test_agent_slurm import SERVICE, agent_config, running_agent
from tests.hub.helpers import running_hub

pytestmark = [pytest.mark.e2e, pytest.mark.slurm, pytest.mark.ssh]


@pytest.fixture
def job_prefix(slurm_cluster: SlurmSandbox) -> Iterator[str]:
    name = "e" + uuid.uuid4().hex[:8]
    yield name
    slurm_cluster.run(["scancel", f"--name={name}-{SERVICE}"])


async def test_chat_through_the_whole_chain(
    tmp_path: Path, slurm_cluster: SlurmSandbox, sshd: SshdSandbox, job_prefix: str
) -> None:
    agent = agent_config(slurm_cluster, sshd.state_dir, job_prefix)
    site = {
        "host": sshd.host, "port": sshd.port, "user": sshd.user,
        "client_key": str(sshd.client_key), "known_hosts": str(sshd.known_hosts),
    }  # fmt: skip
    hub = parse_config(
        {
            "data_dir": str(tmp_path / "hub-data"),
            "upstreams": {"cluster": {"kind": "hpc", "sites": [site], "services_ttl": 0}},
            "models": [{"id": "tiny-public", "upstream": "cluster", "upstream_model": SERVICE}],
        }
    )
    async with running_agent(agent), running_hub(hub, check_tasks=False) as running:
        key = await running.create_key(owner="e2e")
        async with running.client(key) as http:
            async with asyncio.timeout(120):  # a Slurm job starting the stand-in
                while True:
                    models = (await http.get("/v1/models")).json()["data"]
                    if models[0]["status"] == "ready":
                        break
                    assert models[0]["status"] in ("loading", "offline")
                    await asyncio.sleep(0.5)
            body = {
                "model": "tiny-public", "max_tokens": 3,
                "messages": [{"role": "user", "content": "through every hop"}],
            }  # fmt: skip
            answer = await http.post("/v1/chat/completions", json=body)
            assert answer.status_code == 200, answer.text
            assert answer.json()["model"] == "tiny-public"
            assert answer.json()["usage"]["completion_tokens"] == 3
            events = []
            async with http.stream(
                "POST", "/v1/chat/completions", json={**body, "stream": True}
            ) as stream:
                assert stream.status_code == 200
                async for line in stream.aiter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
            assert events[-1] == "[DONE]"
            assert all(json.loads(e)["choices"] for e in events[:-1])
