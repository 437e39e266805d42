"""A throw-away single-node Slurm cluster for the tests and `saia demo`.

`SlurmSandbox` starts its own munged (own key and socket), slurmctld and slurmd on free
loopback ports with a config in its own directory, and four fake GPUs (character devices)
so `--gres=gpu:N` jobs run on a machine without GPUs. Several sandboxes can run on one
machine at the same time: every path, port and cluster name is private. `stop()` cancels
the cluster's jobs and kills exactly the daemons it started.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from saia.sandbox.process import Sandbox, SandboxError, free_port, stop_process
from saia.sandbox.slurm_conf import GPUS, render_gres_conf, render_slurm_conf

__all__ = ["SandboxError", "SlurmSandbox", "render_gres_conf", "render_slurm_conf"]

log = logging.getLogger(__name__)

SBIN = Path("/usr/sbin")
PR_SET_PDEATHSIG = 1
COMMAND_TIMEOUT = 15.0
START_TIMEOUT = 60.0
STOP_GRACE = 10.0
INSTALL_HINT = "install them with `python -m saia.sandbox.packages` (as root)"


def _find(name: str) -> Path:
    for folder in (SBIN, Path("/usr/bin")):
        if (folder / name).exists():
            return folder / name
    found = shutil.which(name)
    if found is None:
        raise SandboxError(
            f"{name} not found: the Slurm/munge packages are missing; {INSTALL_HINT}"
        )
    return Path(found)


def unavailable() -> str | None:
    """Why this machine cannot run the sandbox cluster (missing binaries, not root), or None."""
    try:
        for name in ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scancel"):
            _find(name)
    except SandboxError as error:
        return str(error)
    if os.geteuid() != 0:
        return "the sandbox Slurm cluster runs its daemons as root; run as root"
    return None


def _available_memory_mb() -> int:
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    raise SandboxError("cannot read MemAvailable from /proc/meminfo")


class SlurmSandbox(Sandbox):
    """A private one-node Slurm cluster (munged + slurmctld + slurmd), started by `start()`."""

    def __init__(
        self, root: Path | str | None = None, *, cpus: int | None = None, detach: bool = False
    ) -> None:
        self._given_root = Path(root) if root is not None else None
        self._detach = detach  # daemons outlive this process (`saia sandbox slurm up`)
        self._cpus = cpus or os.cpu_count() or 1
        self.root = Path()
        self._socket_dir: Path | None = None
        self.host = socket.gethostname().split(".")[0]
        self.cluster = ""
        self._procs: list[subprocess.Popen[bytes]] = []
        self._started = False

    # -- public view --------------------------------------------------------------
    @property
    def slurm_conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def bin_dir(self) -> Path:
        """Where sbatch, squeue, scancel and scontrol live."""
        return _find("sbatch").parent

    @property
    def munge_socket(self) -> Path:
        if self._socket_dir is None:
            raise SandboxError("the sandbox has not been started")
        return self._socket_dir / "munge.sock"

    @property
    def env(self) -> dict[str, str]:
        """Environment for Slurm client commands talking to this cluster."""
        path = os.environ.get("PATH", "/usr/bin:/bin")
        return dict(os.environ, SLURM_CONF=str(self.slurm_conf), PATH=f"{self.bin_dir}:{path}")

    @property
    def socket_dir(self) -> Path | None:
        return self._socket_dir

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self._procs]

    def run(
        self, argv: list[str], timeout: float = COMMAND_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command against this cluster (no check; caller judges)."""
        return subprocess.run(
            argv, env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )

    # -- lifetime -----------------------------------------------------------------
    def start(self) -> SlurmSandbox:
        if self._started:
            return self
        reason = unavailable()
        if reason is not None:
            raise SandboxError(reason)
        self._make_root()
        self._started = True
        try:
            self._write_files()
            self._start_munged()
            self._start_slurm()
            self._wait_idle()
        except BaseException:
            self.stop()
            raise
        log.info("slurm sandbox %s ready in %s", self.cluster, self.root)
        return self

    def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        if self._procs and self._procs[-1].poll() is None:
            self._cancel_jobs()
        for proc in reversed(self._procs):
            stop_process(proc, STOP_GRACE)
        self._procs.clear()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None
        if self._given_root is None:
            shutil.rmtree(self.root, ignore_errors=True)

    # -- outages (fault tests) --------------------------------------------------------
    def stop_controller(self) -> None:
        """Stop slurmctld by its pid, as in an outage: Slurm commands fail, slurmd and the
        running jobs go on. `start_controller()` brings it back with its saved state."""
        stop_process(self._procs[self._controller_index()], STOP_GRACE)

    def start_controller(self, *, wait: bool = True) -> None:
        """Start slurmctld again (it recovers the jobs from its state directory);
        with `wait=False` return at once (poll `controller_up()`)."""
        index = self._controller_index()
        if self._procs[index].poll() is None:
            raise SandboxError("slurmctld is running")
        ctld = self._spawn("slurmctld", [str(_find("slurmctld")), "-D", "-f", str(self.slurm_conf)])
        self._procs[index] = self._procs.pop()  # keep the stop order: munged, ctld, slurmd
        if wait:
            self._wait("slurmctld", ctld, self.controller_up)

    def controller_up(self) -> bool:
        """Whether slurmctld answers (`scontrol ping`)."""
        return "UP" in _output([str(self.bin_dir / "scontrol"), "ping"], self.env)

    def _controller_index(self) -> int:
        if not self._started or len(self._procs) < 3:
            raise SandboxError("the sandbox cluster is not running")
        return 1  # started in this order: munged, slurmctld, slurmd

    # -- steps of start() ------------------------------------------------------------
    def _make_root(self) -> None:
        if self._given_root is not None:
            self.root = self._given_root.resolve()
            self.root.mkdir(parents=True, exist_ok=True)
        else:
            self.root = Path(tempfile.mkdtemp(prefix="saia-slurm-", dir="/tmp"))
        # Stable per directory: slurmctld refuses saved state of another cluster name.
        self.cluster = "saia" + hashlib.sha256(str(self.root).encode()).hexdigest()[:8]
        for sub in ("etc", "munge", "state", "spool", "run", "log", "dev"):
            (self.root / sub).mkdir(exist_ok=True)
        (self.root / "munge").chmod(0o700)
        # The socket gets its own short folder under /tmp: its path must fit in sun_path
        # (108 bytes) and munged wants every folder above it traversable by everyone.
        self._socket_dir = Path(tempfile.mkdtemp(prefix="saia-munge-", dir="/tmp"))
        self._socket_dir.chmod(0o755)

    def _write_files(self) -> None:
        key = self.root / "munge" / "munge.key"
        key.unlink(missing_ok=True)
        _check_call([str(_find("mungekey")), "-c", "-k", str(key)], "mungekey")
        for index in range(GPUS):
            device = self.root / "dev" / f"fakegpu{index}"
            if not device.exists():
                # /dev/null's numbers: slurmd wants a character device, reads none of it.
                os.mknod(device, 0o600 | 0o020000, os.makedev(1, 3))
        memory_mb = max(256, int(_available_memory_mb() * 0.5))
        conf = render_slurm_conf(
            root=self.root,
            cluster=self.cluster,
            host=self.host,
            ctld_port=free_port(),
            slurmd_port=free_port(),
            munge_socket=self.munge_socket,
            cpus=self._cpus,
            memory_mb=memory_mb,
            overcommit=self._cpus > (os.cpu_count() or 1),
        )
        self.slurm_conf.write_text(conf, encoding="utf-8")
        gres = render_gres_conf(self.host, self.root / "dev")
        (self.root / "etc" / "gres.conf").write_text(gres, encoding="utf-8")
        (self.root / "etc" / "plugstack.conf").write_text("", encoding="utf-8")

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with open(self.root / "log" / f"{name}.out", "ab") as out:
            proc = subprocess.Popen(
                argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=None if self._detach else _die_with_parent,
            )
        self._procs.append(proc)
        return proc

    def _start_munged(self) -> None:
        munge_dir = self.root / "munge"
        proc = self._spawn(
            "munged",
            [
                str(_find("munged")),
                "--foreground",
                f"--socket={self.munge_socket}",
                f"--key-file={munge_dir / 'munge.key'}",
                f"--pid-file={munge_dir / 'munged.pid'}",
                f"--seed-file={munge_dir / 'munged.seed'}",
                f"--log-file={self.root / 'log' / 'munged.log'}",
            ],
        )
        munge = [str(_find("munge")), "-S", str(self.munge_socket), "-n"]
        self._wait("munged", proc, lambda: self.munge_socket.exists() and _ok(munge, self.env))

    def _start_slurm(self) -> None:
        conf = str(self.slurm_conf)
        ctld = self._spawn("slurmctld", [str(_find("slurmctld")), "-D", "-f", conf])
        ping = [str(self.bin_dir / "scontrol"), "ping"]
        self._wait("slurmctld", ctld, lambda: "UP" in _output(ping, self.env))
        slurmd = self._spawn("slurmd", [str(_find("slurmd")), "-D", "-f", conf])
        show = [str(self.bin_dir / "scontrol"), "show", "node", "-o", self.host]
        self._wait("slurmd", slurmd, lambda: "Arch=" in _output(show, self.env))

    def _wait_idle(self) -> None:
        show = [str(self.bin_dir / "scontrol"), "show", "node", "-o", self.host]

        def idle() -> bool:
            state = _field(_output(show, self.env), "State")
            return state.split("+")[0] == "IDLE"

        self._wait("slurmd", self._procs[-1], idle)

    def _wait(self, name: str, proc: subprocess.Popen[bytes], ready: _Probe) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SandboxError(f"{name} exited with {proc.returncode}: {self._log_tail(name)}")
            if ready():
                return
            time.sleep(0.2)
        raise SandboxError(f"{name} not ready within {START_TIMEOUT:.0f}s: {self._log_tail(name)}")

    def _log_tail(self, name: str) -> str:
        lines: list[str] = []
        for path in (self.root / "log" / f"{name}.out", self.root / "log" / f"{name}.log"):
            if path.exists():
                lines += path.read_text(encoding="utf-8", errors="replace").splitlines()[-5:]
        return " | ".join(lines) or "(no log output)"

    # -- steps of stop() -------------------------------------------------------------
    def _cancel_jobs(self) -> None:
        """Cancel every job of this private cluster and wait (bounded) until they are gone."""
        squeue = [str(self.bin_dir / "squeue"), "--noheader", "--format=%i"]
        job_ids = _output(squeue, self.env).split()
        if not job_ids:
            return
        _ok([str(self.bin_dir / "scancel"), *job_ids], self.env)
        deadline = time.monotonic() + STOP_GRACE + 10
        while time.monotonic() < deadline and _output(squeue, self.env).split():
            time.sleep(0.5)


_Probe = Callable[[], bool]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the process that started it dies.

    A killed test run must not leave a cluster behind (stop() never ran).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _check_call(argv: list[str], what: str) -> None:
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
    )
    if result.returncode != 0:
        first = (result.stderr.strip().splitlines() or ["no message"])[0]
        raise SandboxError(f"{what} failed ({result.returncode}): {first}")


def _output(argv: list[str], env: dict[str, str]) -> str:
    """stdout of a successful command, '' when it failed or timed out."""
    try:
        result = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        return ""
    return result.stdout if result.returncode == 0 else ""


def _ok(argv: list[str], env: dict[str, str]) -> bool:
    try:
        result = subprocess.run(
            argv, env=env, capture_output=True, timeout=COMMAND_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0


def _field(line: str, key: str) -> str:
    """The value of `Key=value` in one-line `scontrol show -o` output."""
    for word in line.split():
        if word.startswith(f"{key}="):
            return word.split("=", 1)[1]
    return ""
