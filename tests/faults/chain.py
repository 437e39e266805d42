"""The real chain of the fault tests, as separate processes like in production.

`FaultChain(root, cluster, services).start()` starts, each stopped by its pid in `stop()`:
a real sshd (saia/sandbox/sshd.py) whose key is forced to the relay, the agent (`saia hpc
agent --drain-on-exit`, which the relay would also start if it died) on the sandbox Slurm
cluster, and the hub (`saia hub serve`, SQLite) with one `hpc` upstream over that sshd and
a few API keys. The agent runs the services as Slurm jobs of the stand-in model server.

It also gives the views a report needs: our Slurm jobs, the processes of our jobs (found by
the job name Slurm puts into their environment), the hub's model status and usage rows,
and the faults: SIGKILL of a job's server, scancel, Slurm's SIGTERM to a job (preemption).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml
from sqlalchemy import func, select

from hpc.config import AgentConfig, parse_config
from hpc.jobs.slurm import SlurmJobSystem
from hpc.jobs.system import JobInfo, JobTag
from hpc.scheduler.state import agent_id
from hub.storage import open_engine, usage
from saia.sandbox.process import free_port, stop_process
from saia.sandbox.slurm import SlurmSandbox
from saia.sandbox.sshd import SshdSandbox
from tests.faults.load import Load
from tests.hpc.scheduler.test_agent_slurm import STANDIN_SERVICE, cluster_settings

BASE_SERVICE: dict[str, Any] = STANDIN_SERVICE | {"server_args": ["--token-delay", "0.05"]}
ROUTER: dict[str, Any] = {"queue_timeout": 30}  # longer than any replacement takes
HUB_TIMEOUTS = {"connect": 10, "first_byte": 45, "idle": 30}
START_LIMIT = 120.0  # the hub up and every service's first job ready
AGENT_STOP = 75.0  # --drain-on-exit waits up to 60 s for its cancelled jobs
STOP_GRACE = 15.0
COMMAND_TIMEOUT = 30.0


class ChainError(RuntimeError):
    """The chain did not come up; str() says which part and shows its log's tail."""


Chain = TypeVar("Chain", bound="FaultChain")


@contextlib.contextmanager
def running(chain: Chain) -> Iterator[Chain]:
    """`chain` started, for a fixture: a start that fails fails the test in one line; on
    exit the chain is stopped and must have left nothing behind."""
    try:
        chain.start()
    except ChainError as error:
        pytest.fail(f"the chain did not start: {error}", pytrace=False)
    try:
        yield chain
    finally:
        left = chain.stop()
    assert not left, f"the chain left behind: {left}"


def _tail(path: Path, lines: int = 5) -> str:
    with contextlib.suppress(OSError):
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    return "(no log)"


class FaultChain:
    """Owns the sshd, agent and hub processes of one chain; `stop()` ends them by pid."""

    def __init__(
        self,
        root: Path,
        cluster: SlurmSandbox,
        services: list[dict[str, Any]],
        router: dict[str, Any] | None = None,
        keys: int = 3,
        extra: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.root, self.cluster = root, cluster
        # Top-level config keys merged into the agent's and the hub's file ("agent", "hub").
        self.extra = extra or {}
        self.prefix = "f" + uuid.uuid4().hex[:8]
        self.state_dir = root / "state"
        self.services = [BASE_SERVICE | {"model": s["name"]} | s for s in services]
        self.router = ROUTER | (router or {})
        self.key_count = keys
        self.keys: list[str] = []
        self.port = free_port()
        self.hub_url = f"http://127.0.0.1:{self.port}"
        self.sshd: SshdSandbox | None = None
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.config: AgentConfig | None = None

    @property
    def names(self) -> list[str]:
        return [str(s["name"]) for s in self.services]

    def load(self, model: str, **options: Any) -> Load:
        """A load on `model` through this chain's hub, taking turns over its keys."""
        return Load(self.hub_url, model, self.keys, **options)

    # -- lifetime -----------------------------------------------------------------------
    def start(self) -> FaultChain:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self.state_dir.mkdir(mode=0o700, parents=True)
        settings = cluster_settings(self.cluster, self.state_dir, self.prefix)
        agent_yaml = settings | {"router": self.router, "services": self.services}
        agent_yaml |= self.extra.get("agent", {})
        agent_path = self.root / "agent.yaml"
        agent_path.write_text(yaml.safe_dump(agent_yaml, sort_keys=False))
        self.config = parse_config(agent_yaml)
        saia = [sys.executable, "-m", "saia"]
        agent = [*saia, "hpc", "agent", "-c", str(agent_path), "--drain-on-exit"]
        self._spawn("agent", agent)
        self._wait_socket()  # else the first relay would start a second agent
        self.sshd = SshdSandbox(self.root / "sshd", self.state_dir, agent=agent[:-1]).start()
        hub_path = self.root / "hub.yaml"
        hub_path.write_text(yaml.safe_dump(self._hub_config() | self.extra.get("hub", {})))
        self.keys = [self._create_key(hub_path, f"user{i}") for i in range(self.key_count)]
        self._spawn("hub", [*saia, "hub", "serve", "-c", str(hub_path)])
        self._wait_ready()

    def _hub_config(self) -> dict[str, Any]:
        assert self.sshd is not None
        site = {
            "host": self.sshd.host, "port": self.sshd.port, "user": self.sshd.user,
            "client_key": str(self.sshd.client_key), "known_hosts": str(self.sshd.known_hosts),
        }  # fmt: skip
        upstream = {"kind": "hpc", "sites": [site], "services_ttl": 0, "timeouts": HUB_TIMEOUTS}
        return {
            "host": "127.0.0.1",
            "port": self.port,
            "data_dir": str(self.root / "hub-data"),
            "usage_flush_interval": 0.2,
            "upstreams": {"cluster": {**upstream}},
            "models": [{"id": name, "upstream": "cluster"} for name in self.names],
        }

    def _spawn(self, name: str, argv: list[str]) -> None:
        with (self.root / f"{name}.log").open("ab") as log:
            self.processes[name] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )

    def _wait_socket(self) -> None:
        deadline = time.monotonic() + START_LIMIT
        while not (self.state_dir / "agent.sock").exists():
            if self.processes["agent"].poll() is not None or time.monotonic() > deadline:
                raise ChainError(f"the agent did not listen: {_tail(self.root / 'agent.log')}")
            time.sleep(0.1)

    def _create_key(self, hub_path: Path, name: str) -> str:
        argv = [sys.executable, "-m", "saia", "hub", "keys", "create", "-c", str(hub_path)]
        done = subprocess.run(
            [*argv, "--name", name], capture_output=True, text=True, timeout=60, check=False
        )
        if done.returncode != 0 or not done.stdout.strip():
            raise ChainError(f"saia hub keys create failed: {done.stderr.strip()[-500:]}")
        return done.stdout.strip().splitlines()[-1]

    def _wait_ready(self) -> None:
        """Until the hub lists every service as ready (a job of each runs the stand-in)."""
        deadline = time.monotonic() + START_LIMIT
        headers = {"authorization": f"Bearer {self.keys[0]}"}
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    log = _tail(self.root / f"{name}.log")
                    raise ChainError(f"the {name} exited ({process.returncode}): {log}")
            with contextlib.suppress(httpx.HTTPError, ValueError):
                answer = httpx.get(f"{self.hub_url}/v1/models", headers=headers, timeout=5)
                states = {m["id"]: m.get("status", "") for m in answer.json()["data"]}
                if all(states.get(name) == "ready" for name in self.names):
                    return
            time.sleep(0.5)
        raise ChainError(f"not ready within {START_LIMIT:.0f} s: {states}; see {self.root}")

    def stop(self) -> list[str]:
        """Stop everything by pid (hub, agent, a relay-started agent, sshd); what was left.

        The agent drains on exit (cancels its jobs and waits for them), so what remains
        afterwards (jobs, job processes, relays, agents) is a leak; it is then removed.
        """
        self.stop_hub_and_agents()
        if self.sshd is not None:
            self.sshd.stop()
            self.sshd = None
        return self._remove_leftovers()

    def stop_hub_and_agents(self) -> None:
        """The hub first (else it reconnects and a relay starts an agent), then the agents."""
        if hub := self.processes.pop("hub", None):
            stop_process(hub, STOP_GRACE)
        if agent := self.processes.pop("agent", None):
            stop_process(agent, AGENT_STOP)
        self._stop_relay_started_agent()

    def _stop_relay_started_agent(self) -> None:
        """The relay starts an agent if ours died (a fault may do that): stop it too."""
        for pid in self._pids_with(str(self.root / "agent.yaml")):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + AGENT_STOP
        while self._pids_with(str(self.root / "agent.yaml")) and time.monotonic() < deadline:
            time.sleep(0.2)

    def _remove_leftovers(self) -> list[str]:
        left = []
        names = [f"--name={self.prefix}-{name}" for name in self.names]
        for name in names:
            squeue = self.cluster.run(["squeue", "--noheader", "--format=%i", name])
            if jobs := squeue.stdout.split():
                left.append(f"Slurm jobs {jobs}")
                self.cluster.run(["scancel", name])
        deadline = time.monotonic() + STOP_GRACE
        pids: list[int] = []
        while time.monotonic() < deadline:
            pids = [p for ps in self.job_processes().values() for p in ps]
            pids += self._pids_with(f"--state-dir {self.state_dir}")  # relays
            pids += self._pids_with(str(self.root / "agent.yaml"))
            if not pids:
                break
            time.sleep(0.2)
        for pid in pids:
            left.append(f"process {pid}: {_cmdline(pid)[:200]}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return left

    # -- views ------------------------------------------------------------------------------
    async def jobs(self) -> list[JobInfo]:
        """Our jobs that Slurm still lists (pending, running, completing)."""
        assert self.config is not None
        tag = JobTag(self.config.job_prefix, agent_id(self.state_dir))
        async with asyncio.timeout(COMMAND_TIMEOUT):
            return await SlurmJobSystem(self.config, tag).list_jobs()

    async def running_jobs(self, service: str) -> list[str]:
        return [j.job_id for j in await self.jobs() if j.service == service and j.running]

    def job_processes(self) -> dict[str, list[int]]:
        """Pids of live processes that Slurm started for our jobs, per job id."""
        found: dict[str, list[int]] = {}
        wanted = {f"SLURM_JOB_NAME={self.prefix}-{name}".encode() for name in self.names}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:  # gone meanwhile, or a kernel thread
                continue
            if wanted.isdisjoint(environ) or _is_zombie(entry):
                continue
            job = next((v[13:] for v in environ if v.startswith(b"SLURM_JOB_ID=")), b"?")
            found.setdefault(job.decode(), []).append(int(entry.name))
        return found

    def server_pids(self, job_id: str) -> list[int]:
        """The job's model server (the stand-in), not its job script."""
        return [p for p in self.job_processes().get(job_id, []) if "hpc.standin" in _cmdline(p)]

    def _pids_with(self, text: str) -> list[int]:
        own = os.getpid()
        return [
            int(e.name)
            for e in Path("/proc").iterdir()
            if e.name.isdigit() and int(e.name) != own and text in _cmdline(int(e.name))
        ]

    async def model_status(self, model: str) -> str:
        headers = {"authorization": f"Bearer {self.keys[0]}"}
        try:
            async with httpx.AsyncClient(base_url=self.hub_url, trust_env=False) as client:
                answer = await client.get("/v1/models", headers=headers, timeout=10)
            states = {m["id"]: m.get("status", "") for m in answer.json()["data"]}
        except (httpx.HTTPError, ValueError, KeyError):
            return "hub unreachable"
        return str(states.get(model, "not listed"))

    async def usage_rows(self, request_ids: list[str]) -> dict[str, int]:
        """How many usage rows the hub wrote per request id."""
        engine = open_engine(f"sqlite+aiosqlite:///{self.root / 'hub-data' / 'hub.db'}")
        try:
            counted: dict[str, int] = dict.fromkeys(request_ids, 0)
            query = select(usage.c.request_id, func.count()).group_by(usage.c.request_id)
            async with engine.connect() as connection:
                for request_id, count in (await connection.execute(query)).all():
                    if request_id in counted:
                        counted[request_id] = count
            return counted
        finally:
            await engine.dispose()

    # -- faults -----------------------------------------------------------------------------
    def kill_server(self, job_id: str) -> int:
        """SIGKILL the job's model server, as if it crashed; its pid."""
        (pid,) = self.server_pids(job_id)
        os.kill(pid, signal.SIGKILL)
        return pid

    async def scancel(self, job_id: str, *options: str) -> None:
        """scancel with `options` (e.g. --signal=TERM --full: Slurm's preemption signal)."""
        argv = [str(self.cluster.bin_dir / "scancel"), *options, job_id]
        process = await asyncio.create_subprocess_exec(
            *argv, env=self.cluster.env, stdout=asyncio.subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT):
                output, _ = await process.communicate()
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        if process.returncode != 0:
            raise RuntimeError(f"scancel failed ({process.returncode}): {output.decode()}")

    async def preempt(self, job_id: str) -> None:
        """What Slurm does to a preempted job first: SIGTERM to all of its processes."""
        await self.scancel(job_id, "--signal=TERM", "--full")


def _cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def _is_zombie(entry: Path) -> bool:
    try:
        return (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True
