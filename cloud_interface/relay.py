"""saia relay: the forced command of the hub's SSH key on the login node.

authorized_keys runs it as `python3 -I -S relay.py --state-dir DIR [--agent CMD]` for every
connection of the hub's key (the line comes from `saia hpc authorized-keys`). Its own argv is
written by the operator and trusted; everything from the client is hostile.

It checks the client's SSH_ORIGINAL_COMMAND against a tiny versioned grammar, connects to the
agent's Unix socket `<state dir>/agent.sock` (starting the agent once if nobody answers,
guarded by a file lock) and then copies bytes both ways between the SSH channel
(stdin/stdout) and the socket. It never parses the frames: the agent validates everything.

Runs on the login node's system python3: stdlib only, Python 3.8 compatible, imports kept
few so that it starts fast. Nothing from the client is passed to a shell or used in a path.
"""

from __future__ import annotations

import _socket  # the C module: `socket` would import enum & co (start-up time)
import _thread
import os
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # no runtime import: start-up time matters
    import subprocess

NAME = "saia-relay"
VERSION = "1"
COMMANDS = {NAME + " " + VERSION: "relay", NAME + " " + VERSION + " ping": "ping"}
MAX_COMMAND = 256
SOCKET_NAME = "agent.sock"
LOCK_NAME = "relay-start.lock"
START_LOG = "agent-start.log"
BUFFER = 256 * 1024
EXIT_USAGE = 2
EXIT_FAILED = 1


class RelayError(Exception):
    """Reported as one line on stderr; the relay exits with `code`."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def _refused(message: str) -> RelayError:
    return RelayError(message, EXIT_USAGE)


class Settings:
    """Trusted settings from the forced command's own argv."""

    def __init__(self, state_dir: str, agent: str | None, start_timeout: float) -> None:
        self.state_dir = state_dir
        self.agent = agent
        self.start_timeout = start_timeout


def parse_argv(argv: list[str]) -> Settings:
    """`--state-dir DIR [--agent CMD] [--start-timeout SECONDS]` (argparse is slow to import)."""
    values: dict[str, str] = {}
    index = 0
    while index < len(argv):
        option = argv[index]
        if option not in ("--state-dir", "--agent", "--start-timeout") or index + 1 >= len(argv):
            raise _refused("relay configuration: unexpected argument %r" % option)
        values[option] = argv[index + 1]
        index += 2
    state_dir = values.get("--state-dir")
    if not state_dir or not os.path.isabs(state_dir):
        raise _refused("relay configuration: --state-dir must be an absolute path")
    try:
        start_timeout = float(values.get("--start-timeout", "30"))
    except ValueError:
        raise _refused("relay configuration: --start-timeout must be a number") from None
    return Settings(state_dir, values.get("--agent") or None, start_timeout)


def parse_command(original: str | None) -> str:
    """Map SSH_ORIGINAL_COMMAND to an action ("relay" or "ping"); anything else is refused."""
    if original is None:
        raise _refused("this key only runs the saia relay: ask for '%s %s'" % (NAME, VERSION))
    if len(original) <= MAX_COMMAND and original in COMMANDS:
        return COMMANDS[original]
    words = original[:MAX_COMMAND].split(" ")
    if len(words) >= 2 and words[0] == NAME and words[1] != VERSION and words[1].isdigit():
        raise _refused("unsupported %s protocol version (this relay speaks %s)" % (NAME, VERSION))
    raise _refused("command refused: this key only runs '%s %s'" % (NAME, VERSION))


def connect(path: str) -> _socket.socket | None:
    """The agent's socket, or None if no agent listens there."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    except OSError as error:
        sock.close()
        raise RelayError("cannot connect to the agent socket: %s" % error.strerror) from None
    return sock


def _lock(path: str, deadline: float) -> int:
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise RelayError("timed out waiting for another relay starting the agent") from None
            time.sleep(0.05)


def _start_agent(settings: Settings) -> subprocess.Popen[bytes]:
    import shlex
    import subprocess

    argv = shlex.split(settings.agent or "")
    if not argv:
        raise _refused("relay configuration: --agent is empty")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSH_")}
    log_path = os.path.join(settings.state_dir, START_LOG)
    with open(log_path, "ab") as log, open(os.devnull, "rb") as devnull:
        try:
            return subprocess.Popen(
                argv,
                stdin=devnull,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                env=env,
                cwd=settings.state_dir,
            )
        except OSError as error:
            raise RelayError("cannot start the agent: %s" % error.strerror) from None


def connect_or_start(settings: Settings) -> _socket.socket:
    path = os.path.join(settings.state_dir, SOCKET_NAME)
    sock = connect(path)
    if sock is not None:
        return sock
    if not settings.agent:
        raise RelayError("the saia agent is not running and this relay may not start it")
    if not os.path.isdir(settings.state_dir):
        raise _refused("relay configuration: the state directory does not exist")
    deadline = time.monotonic() + settings.start_timeout
    lock = _lock(os.path.join(settings.state_dir, LOCK_NAME), deadline)
    try:
        sock = connect(path)  # another relay may have started it while we waited
        if sock is not None:
            return sock
        process = _start_agent(settings)
        while time.monotonic() < deadline:
            time.sleep(0.05)
            sock = connect(path)
            if sock is not None:
                return sock
            code = process.poll()
            if code is not None:
                raise RelayError("the agent exited at start (code %s), see %s" % (code, START_LOG))
        raise RelayError("the agent did not open its socket within %.0f s" % settings.start_timeout)
    finally:
        os.close(lock)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _client_to_agent(sock: _socket.socket) -> None:
    """stdin -> socket; at EOF half-close the socket so the agent sees the end."""
    try:
        while True:
            data = os.read(0, BUFFER)
            if not data:
                break
            sock.sendall(data)
    except OSError:
        pass
    try:  # noqa: SIM105 - contextlib would cost start-up time
        sock.shutdown(_socket.SHUT_WR)
    except OSError:
        pass


def relay(sock: _socket.socket) -> None:
    """Copy bytes both ways until the agent's side ends (or the client cannot take more).

    The other direction runs on a bare thread: it dies with the process when this ends.
    """
    sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_SNDBUF, BUFFER)
    _thread.start_new_thread(_client_to_agent, (sock,))
    try:
        while True:
            data = sock.recv(BUFFER)
            if not data:
                break
            _write_all(1, data)
    except OSError:
        pass
    finally:
        sock.close()


def main(argv: list[str]) -> int:
    try:
        settings = parse_argv(argv[1:])
        action = parse_command(os.environ.get("SSH_ORIGINAL_COMMAND"))
        if action == "ping":
            _write_all(1, ("%s %s pong\n" % (NAME, VERSION)).encode())
            return 0
        sock = connect_or_start(settings)
    except RelayError as error:
        sys.stderr.write("saia-relay: error: %s\n" % error)
        return error.code
    relay(sock)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
