"""Nobody but the agent reaches a backend, and nobody can pose as one (issue 9, items 6-8).

Fast tests with the stand-in, which guards like vLLM 0.32 (its own key check on `/v1`
only, an operator's `--middleware` around it), and with the rendered job script run by
bash as Slurm would (the local executor's way): the job's middleware puts the key on
every path but `/health`, and the job publishes its endpoint only when its own server
holds the port, in a 0600 file in a 0700 dir that the agent reads only if it is ours.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from hpc.config import AgentConfig, parse_config
from hpc.jobs.script import render_job
from hpc.jobs.system import JobTag, job_dir, private_dir, read_endpoint
from hpc.scheduler.health import read_backend_key
from saia.sandbox.process import free_port
from slurm.saia_backend_auth import BackendKeyMiddleware
from tests.fixtures.standin import StandinProcess

Factory = Callable[..., StandinProcess]
KEY = "k" * 64
MIDDLEWARE = "slurm.saia_backend_auth.BackendKeyMiddleware"
CHAT: dict[str, object] = {
    "model": "standin-model",
    "messages": [{"role": "user", "content": "hi"}],
}
# Every route the stand-in serves (vLLM's own paths), with a body that works there.
ROUTES: list[tuple[str, str, dict[str, object] | None]] = [
    ("GET", "/v1/models", None),
    ("POST", "/v1/chat/completions", CHAT),
    ("POST", "/v1/completions", {"model": "standin-model", "prompt": "hi"}),
    ("POST", "/v1/embeddings", {"model": "standin-model", "input": "hi"}),
    ("POST", "/invocations", CHAT),
    ("POST", "/tokenize", {"prompt": "hi there"}),
    ("GET", "/metrics", None),
]
WAIT = 30.0
TAG = JobTag(prefix="saia", agent_id="test")


def answers(
    url: str, headers: dict[str, str], verify: ssl.SSLContext | bool = True
) -> dict[str, int]:
    with httpx.Client(base_url=url, timeout=10, trust_env=False, verify=verify) as client:
        return {
            path: client.request(method, path, json=body, headers=headers).status_code
            for method, path, body in ROUTES
        }


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_like_vllm_the_server_alone_guards_only_v1(standin_factory: Factory) -> None:
    """The gap of issue 9 item 6: `/invocations` runs a chat, `/metrics` and `/tokenize`
    answer, all without the key that `/v1` demands."""
    server = standin_factory(api_key=KEY)
    keyless = answers(server.url, {})
    assert keyless["/v1/models"] == keyless["/v1/chat/completions"] == 401
    assert keyless["/invocations"] == keyless["/tokenize"] == keyless["/metrics"] == 200


def test_job_middleware_requires_the_key_on_every_path(
    standin_factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLLM_API_KEY", KEY)  # where vLLM and the middleware read it
    server = standin_factory(api_key=KEY, extra_args=["--middleware", MIDDLEWARE])
    assert set(answers(server.url, {}).values()) == {401}
    assert set(answers(server.url, bearer("k" * 63)).values()) == {401}
    assert set(answers(server.url, {"Authorization": f"Basic {KEY}"}).values()) == {401}
    assert set(answers(server.url, bearer(KEY)).values()) == {200}
    with httpx.Client(base_url=server.url, timeout=10, trust_env=False) as client:
        refused = client.post("/tokenize", json={"prompt": "x"})
        assert refused.json()["error"]["code"] == 401
        assert client.get("/health").status_code == 200  # liveness only, no key
        assert client.get("/health/../metrics").status_code == 401  # no path tricks
        twice = [("authorization", f"Bearer {KEY}"), ("authorization", "Bearer other")]
        assert client.get("/metrics", headers=twice).status_code == 401


def test_middleware_fails_closed_without_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    async def app(scope: object, receive: object, send: object) -> None:
        raise AssertionError("never called")

    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    with pytest.raises(RuntimeError, match="VLLM_API_KEY"):
        BackendKeyMiddleware(app)


# -- the agent's side: only its own 0600 files count ---------------------------------------
def test_agent_refuses_endpoint_and_key_files_it_did_not_write_0600(tmp_path: Path) -> None:
    folder = private_dir(job_dir(tmp_path, "9"))
    endpoint, key = folder / "endpoint.json", folder / "api_key"
    endpoint.write_text('{"host": "127.0.0.1", "port": 8000}')
    key.write_text("secret\n")
    endpoint.chmod(0o644)
    key.chmod(0o640)
    assert read_endpoint(tmp_path, "9") is None
    assert read_backend_key(tmp_path, "9") is None
    endpoint.chmod(0o600)
    key.chmod(0o600)
    assert read_endpoint(tmp_path, "9") is not None
    assert read_backend_key(tmp_path, "9") == "secret"
    (folder / "real.json").write_bytes(endpoint.read_bytes())
    (folder / "real.json").chmod(0o600)
    endpoint.unlink()
    endpoint.symlink_to(folder / "real.json")  # a link could point anywhere
    assert read_endpoint(tmp_path, "9") is None
    if os.geteuid() == 0:  # only root can give a file away
        os.chown(key, 65534, 65534)
        assert read_backend_key(tmp_path, "9") is None


def test_private_dir_narrows_an_existing_dir(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    private_dir(state)
    private_dir(state / "jobs")
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "jobs").stat().st_mode) == 0o700


# -- the job script, run by bash as Slurm would ----------------------------------------------
class Job:
    """The rendered standin job in its own process group, job id 41."""

    def __init__(self, config: AgentConfig, tmp_path: Path) -> None:
        self.dir = job_dir(config.state_dir, "41")
        private_dir(config.state_dir)  # as the job systems do before submitting
        private_dir(config.state_dir / "jobs")
        script = render_job(config.services[0], config, TAG).script
        env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "SLURM_JOB_ID": "41"}
        self.output = tmp_path / "job.out"
        with self.output.open("w") as out:
            self.process = subprocess.Popen(
                ["bash", "-c", script],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def close(self) -> None:
        """Stop it (SIGTERM to the batch shell, as Slurm does), then anything left."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=WAIT)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=WAIT)


@pytest.fixture
def jobs() -> Iterator[list[Job]]:
    started: list[Job] = []
    yield started
    for job in started:
        job.close()


def standin_config(tmp_path: Path, port: int | None = None) -> AgentConfig:
    """A standin service; with `port`, the job's port choice is forced to it (through the
    python it asks for a free port, as the server runs from `server_command`)."""
    python = sys.executable
    if port is not None:
        fixed = tmp_path / "fixed-port-python"
        fixed.write_text(f"#!/bin/bash\necho {port}\n")
        fixed.chmod(0o700)
        python = str(fixed)
    service = {
        "name": "standin-model",
        "model": "standin-model",
        "template": "standin",
        "server_command": [sys.executable, "-m", "hpc.standin"],
    }
    return parse_config(
        {
            "state_dir": str(tmp_path / "state"),
            "python": python,
            "backend_bind_host": "127.0.0.1",
            "backend_advertise_host": "127.0.0.1",
            "services": [service],
        }
    )


def wait(check: Callable[[], object], what: str, job: Job) -> None:
    deadline = time.monotonic() + WAIT
    while not check():
        assert time.monotonic() < deadline, f"{what}: {job.text()}"
        time.sleep(0.05)


def test_job_publishes_0600_endpoint_of_its_guarded_server(tmp_path: Path, jobs: list[Job]) -> None:
    config = standin_config(tmp_path)
    job = Job(config, tmp_path)
    jobs.append(job)
    wait(lambda: read_endpoint(config.state_dir, "41"), "no endpoint", job)
    endpoint = read_endpoint(config.state_dir, "41")
    assert endpoint is not None
    for path, mode in (
        (job.dir, 0o700),
        (job.dir / "endpoint.json", 0o600),
        (job.dir / "api_key", 0o600),
        (job.dir / "python" / "saia_backend_auth.py", 0o600),
        (job.dir / "tls", 0o700),
        (job.dir / "tls" / "key.pem", 0o600),
        (job.dir / "tls" / "cert.pem", 0o600),
    ):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
    key = read_backend_key(config.state_dir, "41")
    assert key is not None
    tls = endpoint.tls()  # the job serves TLS by default (backend_tls), pinned
    assert tls is not None and endpoint.url.startswith("https://")
    assert set(answers(endpoint.url, {}, tls).values()) == {401}
    assert set(answers(endpoint.url, bearer(key), tls).values()) == {200}
    job.close()
    assert job.process.returncode == 0, job.text()
    assert not (job.dir / "endpoint.json").exists()  # the port is no longer the job's


def catches_sigterm(marker: str) -> bool:
    """A python process with `marker` in its command line (not the job's bash, whose
    script holds it too) has a SIGTERM handler installed."""
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if argv[0] != sys.executable.encode() or marker.encode() not in argv:
                continue
            status = (entry / "status").read_text()
        except (OSError, NotADirectoryError):
            continue
        caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
        if int(caught.split()[1], 16) & (1 << (signal.SIGTERM - 1)):
            return True
    return False


def test_job_stopped_before_its_server_listens_ends_cleanly(
    tmp_path: Path, jobs: list[Job]
) -> None:
    """SIGTERM while the job still waits for the port (vLLM loading a model): the server
    is stopped, nothing is published, and the job reports the server's own status."""
    config = standin_config(tmp_path)
    never_listens = (
        "import signal, sys, time; signal.signal(15, lambda *_: sys.exit(0)); time.sleep(60)"
    )
    service = config.services[0].model_copy(
        update={"server_command": [sys.executable, "-c", never_listens]}
    )
    config = config.model_copy(update={"services": [service]})
    job = Job(config, tmp_path)
    jobs.append(job)
    # Once the server catches SIGTERM it is running and the job is in its wait loop.
    wait(lambda: catches_sigterm(never_listens), "the server did not start", job)
    job.process.send_signal(signal.SIGTERM)
    assert job.process.wait(timeout=WAIT) == 0, job.text()
    assert "server exited with status 0" in job.text()
    assert not (job.dir / "endpoint.json").exists()


def listener(host: str, port: int) -> socket.socket:
    sock = socket.socket()
    sock.bind((host, port))
    sock.listen()
    return sock


@pytest.mark.parametrize("taken", ["127.0.0.2", "0.0.0.0"])
def test_port_another_process_listens_on_is_never_published(
    tmp_path: Path, jobs: list[Job], taken: str
) -> None:
    """Someone else bound the job's port first: on another local address (the server
    still starts on 127.0.0.1, but the job sees a listener that is not its own) or on
    all of them (the server cannot bind). Either way the job ends without an endpoint."""
    port = free_port()
    with listener(taken, port):
        config = standin_config(tmp_path, port)
        job = Job(config, tmp_path)
        jobs.append(job)
        try:
            job.process.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the job did not give up: {job.text()}")
        assert job.process.returncode != 0
        assert not (job.dir / "endpoint.json").exists(), job.text()
    if taken != "0.0.0.0":
        assert f"another process listens on port {port}" in job.text()
