"""A throw-away PostgreSQL server for tests and the demo.

initdb into a temporary directory, `postgres` on its own port on 127.0.0.1 (and a Unix
socket in the same directory), trust authentication, durability switched off for speed.
PostgreSQL refuses to run as root, so as root the server runs as the `postgres` system user
(created by Debian's package; `saia/sandbox/packages.py` installs it on a fresh machine).
Stopped by pid (fast shutdown, then SIGKILL), directory removed.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from saia.sandbox.process import Sandbox, SandboxError, free_port, stop_process

SUPERUSER = "saia"
_DATABASE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class PostgresError(SandboxError):
    """The sandbox PostgreSQL cannot be started or used."""


def find_bin_dir() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin with initdb (or $SAIA_PG_BIN)."""
    configured = os.environ.get("SAIA_PG_BIN")
    candidates = [Path(configured)] if configured else []

    def version(path: Path) -> float:
        try:
            return float(path.parent.name)
        except ValueError:
            return 0.0

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    for candidate in candidates:
        if (candidate / "initdb").is_file() and (candidate / "postgres").is_file():
            return candidate
    return None


class PostgresSandbox(Sandbox):
    """`with PostgresSandbox() as pg: pg.url()` -> a running server, gone afterwards."""

    def __init__(self, *, bin_dir: Path | None = None, run_as: str = "postgres") -> None:
        found = bin_dir or find_bin_dir()
        if found is None:
            raise PostgresError("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin)")
        self.bin_dir = found
        self.port = 0
        self.root: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._user = run_as if os.geteuid() == 0 else None

    def _run(self, argv: list[str], timeout: float) -> None:
        result = subprocess.run(
            argv, capture_output=True, timeout=timeout, user=self._user, check=False
        )
        if result.returncode != 0:
            message = result.stderr.decode(errors="replace").strip().splitlines()
            raise PostgresError(f"{Path(argv[0]).name} failed: {message[-1] if message else ''}")

    def start(self, timeout: float = 30.0) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="saia-pg-"))
        if self._user is not None:
            os.chown(self.root, pwd.getpwnam(self._user).pw_uid, -1)
        data = self.root / "data"
        initdb = [str(self.bin_dir / "initdb"), "-D", str(data), "-U", SUPERUSER]
        self._run([*initdb, "--auth=trust", "-E", "UTF8", "--no-sync"], timeout=120)
        self.port = free_port()
        self.start_server(timeout)

    def start_server(self, timeout: float = 30.0) -> None:
        """Run the server on the initialised data directory (again, after `stop_server`)."""
        assert self.root is not None
        options = ["fsync=off", "synchronous_commit=off", "full_page_writes=off"]
        argv = [str(self.bin_dir / "postgres"), "-D", str(self.root / "data")]
        argv += ["-p", str(self.port), "-k", str(self.root), "-h", "127.0.0.1"]
        for option in ["max_connections=200", *options]:
            argv += ["-c", option]
        with open(self.root / "postgres.log", "ab") as output:
            self._process = subprocess.Popen(
                argv, stdout=output, stderr=subprocess.STDOUT, user=self._user,
                start_new_session=True, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        self._wait_ready(timeout)

    def stop_server(self, timeout: float = 15.0) -> None:
        """Stop the server process by pid (fast shutdown), keeping its data: an outage."""
        process, self._process = self._process, None
        if process is not None:
            stop_process(process, timeout, stop_signal=signal.SIGINT)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        isready = [str(self.bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)]
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise PostgresError(f"postgres exited at start: {self.log_tail()}")
            result = subprocess.run(isready, capture_output=True, timeout=10, check=False)
            if result.returncode == 0:
                return
            time.sleep(0.1)
        self.stop()
        raise PostgresError(f"postgres was not ready after {timeout:g} s")

    def log_tail(self, lines: int = 5) -> str:
        path = self.root / "postgres.log" if self.root else None
        if path is None or not path.exists():
            return ""
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+asyncpg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A fresh empty database; returns its SQLAlchemy URL."""
        if not _DATABASE.match(name):
            raise ValueError(f"{name!r} is not a simple database name")
        createdb = [str(self.bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port)]
        self._run([*createdb, "-U", SUPERUSER, name], timeout=30)
        return self.url(name)

    def stop(self, timeout: float = 15.0) -> None:
        self.stop_server(timeout)  # SIGINT: postgres's fast shutdown, clients disconnected
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None
