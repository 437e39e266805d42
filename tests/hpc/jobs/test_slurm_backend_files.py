"""A real Slurm job of the agent keeps its files to the service account (issue 9 item 8).

The agent in-process against the sandbox Slurm cluster with a stand-in job: the state,
jobs and job dirs are 0700, the key, endpoint and log 0600, the backend answers nothing
but `/health` without its key, and the router still serves through it.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import httpx
import pytest

from hpc.jobs.script import log_path
from hpc.jobs.system import job_dir
from saia.base.pinned_tls import pinned_context
from saia.sandbox.slurm import SlurmSandbox
from tests.hpc.scheduler.test_agent_slurm import agent_config, prefix, ready, running_agent, until
from tests.hpc.test_vllm_slurm import router_client

pytestmark = pytest.mark.slurm
__all__ = ["prefix"]  # the fixture, used by name


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def loosen(path: Path) -> None:
    path.chmod(0o755)  # as an operator might have made it: the agent narrows it


async def test_job_files_are_private_and_the_router_still_serves(
    slurm_cluster: SlurmSandbox, prefix: str, tmp_path: Path
) -> None:
    loosen(tmp_path)
    config = agent_config(slurm_cluster, tmp_path, prefix)
    async with running_agent(config) as registry:
        [backend] = await until(lambda: ready(registry), 90, "no ready backend")
        folder = job_dir(tmp_path, backend.job_id)
        assert (mode(tmp_path), mode(tmp_path / "jobs"), mode(folder)) == (0o700,) * 3
        for name in ("endpoint.json", "api_key"):
            assert mode(folder / name) == 0o600, name
        assert mode(log_path(tmp_path, backend.job_id)) == 0o600
        assert backend.certificate and backend.url.startswith("https://")
        verify = pinned_context(backend.certificate)  # the job's own certificate alone
        async with httpx.AsyncClient(
            base_url=backend.url, trust_env=False, timeout=10, verify=verify
        ) as client:
            assert (await client.get("/health")).status_code == 200
            assert (await client.get("/metrics")).status_code == 401
            assert (await client.post("/tokenize", json={"prompt": "a"})).status_code == 401
        async with router_client(tmp_path) as router:
            body = {"model": "tiny", "messages": [{"role": "user", "content": "a b"}]}
            status, answer = await router.request("POST", "/v1/chat/completions", body)
        assert status == 200, answer[:300]
        assert json.loads(answer)["choices"][0]["message"]["content"] == "echo: a b"
