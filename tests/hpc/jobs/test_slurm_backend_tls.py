"""TLS between the agent and a real Slurm job (backend_tls, on by default): the agent in
process against the sandbox Slurm cluster with a stand-in job.

The job makes its own key and certificate, serves TLS only, and publishes the
certificate's SHA-256 in endpoint.json; the agent pins it (probes and router), and a
request through the router is answered. A job whose server shows another certificate than
the one it published (its certificate swapped) is never taken into rotation: the agent
logs it once with the job id and sends it nothing, not even the key.
"""

from __future__ import annotations

import json
import logging
import stat
from pathlib import Path

import httpx
import pytest

from hpc.config import parse_config
from hpc.jobs.system import job_dir
from saia.base.pinned_tls import fingerprint
from saia.sandbox.certs import make_certificate
from saia.sandbox.slurm import SlurmSandbox
from tests.hpc.scheduler.test_agent_slurm import (
    SERVICE,
    STANDIN_SERVICE,
    agent_config,
    cluster_settings,
    prefix,
    ready,
    running_agent,
    until,
)
from tests.hpc.test_vllm_slurm import router_client

pytestmark = pytest.mark.slurm
__all__ = ["prefix"]  # the fixture, used by name
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "a b"}]}
REFUSED = "TLS: the server's certificate is not the one the job published"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_agent_pins_its_jobs_certificate_and_serves_over_tls(
    slurm_cluster: SlurmSandbox, prefix: str, tmp_path: Path
) -> None:
    config = agent_config(slurm_cluster, tmp_path, prefix)
    async with running_agent(config) as registry:
        [backend] = await until(lambda: ready(registry), 90, "no ready backend")
        folder = job_dir(tmp_path, backend.job_id)
        endpoint = json.loads((folder / "endpoint.json").read_text())
        pem = (folder / "tls" / "cert.pem").read_text()
        assert endpoint["scheme"] == "https" and endpoint["tls_sha256"] == fingerprint(pem)
        assert backend.url.startswith("https://") and backend.certificate == pem
        assert (mode(folder / "tls"), mode(folder / "tls" / "key.pem")) == (0o700, 0o600)
        # The port speaks TLS only: nothing in clear text is answered.
        plain = f"http://{endpoint['host']}:{endpoint['port']}/health"
        async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
            with pytest.raises(httpx.TransportError):
                await client.get(plain)
        async with router_client(tmp_path) as router:
            status, answer = await router.request("POST", "/v1/chat/completions", CHAT)
        assert status == 200, answer[:300]
        assert json.loads(answer)["choices"][0]["message"]["content"] == "echo: a b"


async def test_a_job_whose_server_shows_another_certificate_is_refused(
    slurm_cluster: SlurmSandbox,
    prefix: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The server is started with another key and certificate than the job made and
    published (the operator's server_args come last, and argparse keeps the last value)."""
    other = make_certificate(tmp_path / "other")
    swap = ["--ssl-keyfile", str(other.key_file), "--ssl-certfile", str(other.cert_file)]
    settings = cluster_settings(slurm_cluster, tmp_path / "state", prefix)
    service = STANDIN_SERVICE | {"name": SERVICE, "model": "tiny", "server_args": swap}
    waits = {"queue_timeout": 3}  # no backend will come: a short wait for the 503
    config = parse_config(settings | {"router": waits, "services": [service]})
    caplog.set_level(logging.WARNING, logger="hpc.scheduler.health")

    def refusals() -> list[str]:
        return [r.getMessage() for r in caplog.records if REFUSED in r.getMessage()]

    async with running_agent(config) as registry:
        [first] = await until(refusals, 90, "the agent did not refuse the certificate")
        job_id = first.split()[1]
        assert (job_dir(config.state_dir, job_id) / "endpoint.json").exists()
        async with router_client(config.state_dir) as router:
            status, answer = await router.request("POST", "/v1/chat/completions", CHAT)
        assert ready(registry) == []
        assert status == 503, answer[:300]  # after the queue timeout: nothing was sent
    once = [message for message in refusals() if message.split()[1] == job_id]
    assert once == [first], "logged once per job, not once per probe"
    assert "Bearer" not in first and "BEGIN CERTIFICATE" not in first
