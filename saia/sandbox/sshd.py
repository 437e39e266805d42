"""A throw-away OpenSSH sshd on 127.0.0.1 with the hub's key forced to the relay.

For the tests and the demo: own host key and client key (ssh-keygen), the authorized_keys
line made by the same code as `saia hpc authorized-keys`, an own sshd_config (free port,
loopback only, keys only, default MaxSessions), started as `sshd -D` for the current user
and stopped by pid. `known_hosts` pins the host key for `[127.0.0.1]:PORT`.
"""

from __future__ import annotations

import contextlib
import getpass
import socket
import subprocess
import time
from pathlib import Path

from hpc.authorized_keys import authorized_keys_line, default_python, read_public_key, relay_argv
from saia.sandbox.process import (
    LOOPBACK,
    Sandbox,
    SandboxError,
    children_of,
    free_port,
    stop_process,
)

__all__ = ["SandboxError", "SshdSandbox"]

SSHD = Path("/usr/sbin/sshd")
HOST = LOOPBACK
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
COMMAND_TIMEOUT = 30.0


def _run(argv: list[str]) -> None:
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
    )
    if done.returncode != 0:
        raise SandboxError(f"{argv[0]} failed ({done.returncode}): {done.stderr.strip()[:500]}")


class SshdSandbox(Sandbox):
    """sshd for one test or demo run; `with SshdSandbox(root, state_dir) as sshd: ...`."""

    def __init__(
        self,
        root: Path,
        state_dir: Path,
        *,
        agent: list[str] | None = None,
        python: str | None = None,
        from_cidr: str | None = "127.0.0.1/32",
    ) -> None:
        self.root = root
        self.state_dir = state_dir
        self.agent = agent
        self.python = python or default_python()
        self.from_cidr = from_cidr
        self.user = getpass.getuser()
        self.host = HOST
        self.port = 0
        self.host_key = root / "ssh_host_ed25519_key"
        self.client_key = root / "client_ed25519"
        self.known_hosts = root / "known_hosts"
        self.authorized_keys = root / "authorized_keys"
        self.config_path = root / "sshd_config"
        self.log_path = root / "sshd.log"
        self.process: subprocess.Popen[bytes] | None = None

    # -- set-up -----------------------------------------------------------------------
    def _keys(self) -> None:
        keys = ((self.host_key, "saia-sandbox-host"), (self.client_key, "saia-hub"))
        for path, comment in keys:
            if not path.exists():
                _run(
                    ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)]
                )
        key = read_public_key(self.client_key.with_suffix(".pub"))
        argv = relay_argv(self.python, self.state_dir, self.agent)
        line = authorized_keys_line(key, argv, self.from_cidr)
        self.authorized_keys.write_text(line + "\n")
        self.authorized_keys.chmod(0o600)

    def _config(self) -> None:
        self.config_path.write_text(
            f"Port {self.port}\n"
            f"ListenAddress {HOST}\n"
            f"HostKey {self.host_key}\n"
            f"PidFile {self.root / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {self.authorized_keys}\n"
            f"AllowUsers {self.user}\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\n"
            "UsePAM no\n"
            "StrictModes no\n"
            "X11Forwarding no\n"
            "AllowTcpForwarding no\n"
            "LogLevel VERBOSE\n"
        )
        known = self.host_key.with_suffix(".pub").read_text().split()
        self.known_hosts.write_text(f"[{HOST}]:{self.port} {known[0]} {known[1]}\n")

    # -- lifetime ---------------------------------------------------------------------
    def start(self) -> SshdSandbox:
        if not SSHD.exists():
            raise SandboxError(f"{SSHD} is missing: install openssh-server")
        self.root.mkdir(parents=True, exist_ok=True)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)
        self._keys()
        for _attempt in range(3):  # the free port may be taken before sshd binds it
            self.port = free_port()
            self._config()
            _run([str(SSHD), "-t", "-f", str(self.config_path)])
            if self._listen():
                return self
        raise SandboxError(f"sshd did not start; see {self.log_path}")

    def _listen(self) -> bool:
        """Start the listening sshd on the configured port; False (stopped) if it failed."""
        argv = [str(SSHD), "-D", "-f", str(self.config_path), "-E", str(self.log_path)]
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        if self._wait_listening():
            return True
        self.stop()
        return False

    def restart(self) -> None:
        """Stop the listening sshd and start it again on the same port, with the same keys
        (like `systemctl restart ssh`: open sessions are separate processes and stay)."""
        self.stop()
        if not self._listen():
            raise SandboxError(f"sshd did not start again on port {self.port}; see {self.log_path}")

    def session_pids(self) -> list[int]:
        """The per-connection sshd processes (children of the listener), oldest first.

        Killing one drops that client's connection, as a crashed or killed session would.
        """
        if self.process is None:
            return []
        return children_of(self.process.pid)

    def _wait_listening(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                return False
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), 1):
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            stop_process(process, STOP_TIMEOUT)

    def ssh_argv(self, command: str) -> list[str]:
        """An OpenSSH client command line as the hub's key (for hostile-input tests)."""
        return [
            "ssh",
            "-F",
            "none",
            "-i",
            str(self.client_key),
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-p",
            str(self.port),
            f"{self.user}@{HOST}",
            command,
        ]
