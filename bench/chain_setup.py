"""The real chain on loopback for `python -m bench`, every part its own process.

`Chain(root).start()` starts: the agent (`saia hpc agent`, local executor: its stand-in
services run as local jobs, exactly the job scripts Slurm would run), a real sshd whose key
is forced to the relay (saia/sandbox/sshd.py, default MaxSessions), the hub with an `hpc`
upstream over that sshd (`hub_chain`), and a second hub with `openai` upstreams straight to
the same stand-in servers (`hub_openai`). Both hubs use SQLite, usage accounting, and a key
with a per-minute request limit, so the rate counters are on the hot path. `stop()` ends
every process by pid (the agent drains: it stops its jobs).

Three services, each a stand-in server: `instant` (answers at once), `paced` (a token every
`PACED_DELAY` s: one stream's tokens/s) and `slow` (a token every `SLOW_DELAY` s: thousands
of long streams and the soak).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from saia.sandbox.process import free_port, stop_process
from saia.sandbox.process_tree import descendants
from saia.sandbox.sshd import SshdSandbox

PACED_DELAY = 0.002
SLOW_DELAY = 1.0
SERVICES = {"instant": 0.0, "paced": PACED_DELAY, "slow": SLOW_DELAY}
START_LIMIT = 120.0
TIMEOUTS = {"connect": 10, "first_byte": 120, "idle": 60}
SAIA = [sys.executable, "-m", "saia"]


class ChainError(RuntimeError):
    """A part of the chain did not come up; str() says which and shows its log's tail."""


def _tail(path: Path) -> str:
    with contextlib.suppress(OSError):
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-5:])
    return "(no log)"


def _service(name: str, delay: float) -> dict[str, Any]:
    return {
        "name": name,
        "model": name,
        "template": "standin",
        "min_instances": 1,
        "max_instances": 1,
        "target_concurrency": 20000,  # the stand-in never queues: let every stream run
        "startup_timeout": "60s",
        "api_key": False,  # direct calls and the openai hub reach it without a key
        # ... and without the job's pinned certificate, which only the agent trusts; the
        # router's TLS cost is measured by `python -m bench.hop --backend-tls`.
        "backend_tls": False,
        "resources": {"gpus": 0, "cpus": 1, "memory": "1G", "time_limit": "8:00:00"},
        "server_args": ["--token-delay", str(delay)],
    }


@dataclass
class Chain:
    """Owns the chain's processes; `backends` maps service -> the stand-in's base URL."""

    root: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    sshd: SshdSandbox | None = None
    backends: dict[str, str] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)  # hub name -> base URL
    keys: dict[str, str] = field(default_factory=dict)  # hub name -> API key

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    def start(self) -> Chain:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self.state_dir.mkdir(mode=0o700, parents=True)
        agent_path = self.root / "agent.yaml"
        agent_path.write_text(yaml.safe_dump(self._agent_config(), sort_keys=False))
        agent = [*SAIA, "hpc", "agent", "-c", str(agent_path)]
        self._spawn("agent", [*agent, "--drain-on-exit"])
        self._wait(lambda: (self.state_dir / "agent.sock").exists(), "agent", "its socket")
        self.sshd = SshdSandbox(self.root / "sshd", self.state_dir, agent=agent).start()
        self._start_hub("hub_chain", self._chain_upstreams())
        self._wait(self._chain_ready, "hub_chain", "every service ready")
        self._find_backends()
        self._start_hub("hub_openai", self._openai_upstreams())
        self._wait(lambda: self._models_ready("hub_openai"), "hub_openai", "its models")

    def _agent_config(self) -> dict[str, Any]:
        return {
            "state_dir": str(self.state_dir),
            "executor": "local",
            "poll_interval": "1s",
            "health_interval": "2s",
            "backend_bind_host": "127.0.0.1",
            "backend_advertise_host": "127.0.0.1",
            "python": sys.executable,
            # One user sends thousands of streams: queue limits high, and long waits.
            "router": {
                "queue_timeout": "5m",
                "max_queue": 20000,
                "fairness": {"max_queue_per_user": 20000},
            },
            "services": [_service(name, delay) for name, delay in SERVICES.items()],
        }

    def _chain_upstreams(self) -> dict[str, Any]:
        assert self.sshd is not None
        site = {
            "host": self.sshd.host, "port": self.sshd.port, "user": self.sshd.user,
            "client_key": str(self.sshd.client_key), "known_hosts": str(self.sshd.known_hosts),
        }  # fmt: skip
        cluster = {"kind": "hpc", "sites": [site], "timeouts": TIMEOUTS}
        return {"upstreams": {"cluster": cluster}, "models": _models(lambda _name: "cluster")}

    def _openai_upstreams(self) -> dict[str, Any]:
        upstreams = {
            name: {"kind": "openai", "base_url": f"{url}/v1", "timeouts": TIMEOUTS}
            for name, url in self.backends.items()
        }
        return {"upstreams": upstreams, "models": _models(lambda name: name)}

    def _start_hub(self, name: str, settings: dict[str, Any]) -> None:
        port = free_port()
        config = {
            "host": "127.0.0.1",
            "port": port,
            "data_dir": str(self.root / f"{name}-data"),
            "usage_flush_interval": 1.0,
        } | settings
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.keys[name] = _create_key(path)
        self.urls[name] = f"http://127.0.0.1:{port}"
        self._spawn(name, [*SAIA, "hub", "serve", "-c", str(path)])

    def _spawn(self, name: str, argv: list[str]) -> None:
        with (self.root / f"{name}.log").open("ab") as log:
            self.processes[name] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )

    def _wait(self, ready: Any, name: str, what: str) -> None:
        deadline = time.monotonic() + START_LIMIT
        while time.monotonic() < deadline:
            for part, process in self.processes.items():
                if process.poll() is not None:
                    log = _tail(self.root / f"{part}.log")
                    raise ChainError(f"the {part} exited ({process.returncode}): {log}")
            if ready():
                return
            time.sleep(0.3)
        raise ChainError(f"{name}: no {what} in {START_LIMIT:.0f} s; see {self.root}")

    def _models_ready(self, hub: str) -> dict[str, str] | None:
        headers = {"authorization": f"Bearer {self.keys[hub]}"}
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            answer = httpx.get(f"{self.urls[hub]}/v1/models", headers=headers, timeout=5)
            states = {m["id"]: m.get("status", "ready") for m in answer.json()["data"]}
            if all(states.get(name) == "ready" for name in SERVICES):
                return states
        return None

    def _chain_ready(self) -> bool:
        return self._models_ready("hub_chain") is not None

    def _find_backends(self) -> None:
        """Each stand-in job's URL (its endpoint.json), named by the model it serves."""
        for endpoint in (self.state_dir / "jobs").glob("*/endpoint.json"):
            where = json.loads(endpoint.read_text())
            url = f"http://{where['host']}:{where['port']}"
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                answer = httpx.get(f"{url}/v1/models", timeout=5)
                self.backends[answer.json()["data"][0]["id"]] = url
        if set(self.backends) != set(SERVICES):
            raise ChainError(f"stand-in endpoints found: {sorted(self.backends)}")

    def pids(self) -> dict[str, list[int]]:
        """The processes to measure, by part (sshd: the per-connection sshd and relay)."""
        found = {name: [p.pid] for name, p in self.processes.items()}
        agent = found.get("agent", [0])[0]
        found["backends"] = [p for p in descendants(agent) if p != agent]
        sshd = self.sshd.process.pid if self.sshd and self.sshd.process else 0
        below = descendants(sshd) if sshd else []
        found["sshd"] = [p for p in below if _comm(p).startswith("sshd")]
        found["relay"] = [p for p in below if not _comm(p).startswith("sshd")]
        return found

    def stop(self) -> None:
        for name in ("hub_openai", "hub_chain"):
            if hub := self.processes.pop(name, None):
                stop_process(hub, 15)
        if agent := self.processes.pop("agent", None):
            stop_process(agent, 60)  # --drain-on-exit: it stops its jobs first
        if self.sshd is not None:
            self.sshd.stop()
            self.sshd = None


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _models(upstream: Any) -> list[dict[str, str]]:
    return [{"id": name, "upstream": upstream(name)} for name in SERVICES]


def _create_key(config: Path) -> str:
    argv = [*SAIA, "hub", "keys", "create", "-c", str(config), "--name", "bench"]
    argv += ["--user", "bench", "--requests-per-minute", "100000000"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0 or not done.stdout.strip():
        raise ChainError(f"saia hub keys create failed: {done.stderr.strip()[-500:]}")
    return done.stdout.strip().splitlines()[-1]


def raise_open_files() -> int:
    """The soft open-files limit up to the hard one (children inherit it); the new limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return int(resource.getrlimit(resource.RLIMIT_NOFILE)[0])


if __name__ == "__main__":  # python -m bench.chain_setup DIR: start it, wait for Ctrl-C
    chain = Chain(Path(sys.argv[1])).start()
    print(json.dumps({"urls": chain.urls, "keys": chain.keys, "backends": chain.backends}))
    print(json.dumps(chain.pids()), flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            time.sleep(1)
    chain.stop()
    os._exit(0)
