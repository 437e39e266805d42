"""The forced command under attack, through the real sshd: nothing gets past the grammar,
garbage on the channel is refused by the agent, and nothing changes on the login node.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncssh
import pytest

from hpc.config import AgentConfig
from hpc.registry import BackendRegistry
from hpc.router.server import SOCKET_NAME, serve_requests
from saia.base import protocol as wire
from saia.sandbox.sshd import SshdSandbox

pytestmark = pytest.mark.ssh

INJECTIONS = [
    "saia-relay 1; touch {canary}/pwned",
    "saia-relay 1 && touch {canary}/pwned",
    "saia-relay 1 | touch {canary}/pwned",
    "saia-relay $(touch {canary}/pwned) 1",
    "saia-relay `touch {canary}/pwned` 1",
    "saia-relay 1\ntouch {canary}/pwned",
    "saia-relay 1 ../../../../bin/touch {canary}/pwned",
    "../../../../usr/bin/touch {canary}/pwned",
    "saia-relay 9",
    "touch {canary}/pwned",
]


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every path under the roots with its size and mtime: any change shows."""
    seen = {}
    for root in roots:
        for path in [root, *root.rglob("*")]:
            if path.is_file() or path.is_dir():
                info = path.stat()
                seen[str(path)] = (info.st_size, info.st_mtime_ns)
    return seen


@pytest.fixture
def canary(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "canary"
    directory.mkdir()
    (directory / "keep").write_text("unchanged")
    yield directory
    assert not (directory / "pwned").exists()


@pytest.mark.parametrize("template", INJECTIONS)
def test_injected_commands_are_refused(sshd: SshdSandbox, canary: Path, template: str) -> None:
    before = snapshot(canary, sshd.state_dir)
    done = subprocess.run(
        sshd.ssh_argv(template.format(canary=canary)),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("saia-relay: error:"), done.stderr
    assert snapshot(canary, sshd.state_dir) == before


def test_no_command_no_shell(sshd: SshdSandbox, canary: Path) -> None:
    argv = [a for a in sshd.ssh_argv("") if a]  # an interactive login asks for no command
    done = subprocess.run(argv, input="touch pwned\n", capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "this key only runs the saia relay" in done.stderr


@asynccontextmanager
async def router(sshd: SshdSandbox) -> AsyncIterator[None]:
    config = AgentConfig(state_dir=sshd.state_dir)
    task = asyncio.create_task(serve_requests(config, BackendRegistry()))
    try:
        async with asyncio.timeout(10):
            while not (sshd.state_dir / SOCKET_NAME).exists():  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@asynccontextmanager
async def connection(sshd: SshdSandbox) -> AsyncIterator[asyncssh.SSHClientConnection]:
    async with asyncssh.connect(
        sshd.host,
        sshd.port,
        username=sshd.user,
        client_keys=[str(sshd.client_key)],
        known_hosts=str(sshd.known_hosts),
        agent_path=None,
        config=None,
    ) as conn:
        yield conn


async def exchange(sshd: SshdSandbox, payload: bytes) -> bytes:
    """Send raw bytes on a relay channel; return all the agent says until it closes."""
    async with connection(sshd) as conn:
        process = await conn.create_process("saia-relay 1", encoding=None)
        process.stdin.write(payload)
        process.stdin.write_eof()
        async with asyncio.timeout(10):
            reply: bytes = await process.stdout.read()
        return reply


def error_of(reply: bytes) -> wire.ErrorBody:
    frames = wire.FrameDecoder().feed(reply)
    errors = [f for f in frames if f.type == wire.ERROR and f.stream == 0]
    assert errors, frames
    return wire.parse_error(errors[0].payload)


HELLO = wire.encode_hello()


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "unknown frame type"),
        (b"\xff" * 64, "unknown frame type"),
        (HELLO + wire.HEADER.pack(wire.DATA, 0, 1, wire.MAX_DATA + 1), "exceeds"),
        (HELLO + wire.HEADER.pack(wire.REQUEST, 0, 1, 1 << 31), "exceeds"),
        (HELLO + wire.encode_frame(wire.DATA, 5, b"x"), "never opened"),
        (HELLO + wire.encode_frame(wire.RESPONSE, 1, b"{}"), "may not send"),
        (HELLO + wire.encode_frame(wire.REQUEST, 1, b"{}")[:-1], "inside a frame"),
        (wire.encode_frame(wire.PING, 0, b"12345678"), "expected HELLO"),
        (b"\x01\x00\x00\x00\x00\x00\x00\x00\x00\x02{}", "HELLO does not announce"),
    ],
)
async def test_garbage_on_the_channel_is_refused(
    sshd: SshdSandbox, canary: Path, payload: bytes, expected: str
) -> None:
    async with router(sshd):
        before = snapshot(canary, sshd.state_dir)
        reply = await exchange(sshd, payload)
        assert expected in error_of(reply).message
        assert snapshot(canary, sshd.state_dir) == before
        hello = await exchange(sshd, HELLO)  # the agent still serves
        assert wire.FrameDecoder().feed(hello)[0].type == wire.HELLO


async def test_forwarding_and_terminals_are_restricted(sshd: SshdSandbox) -> None:
    async with connection(sshd) as conn:
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.open_connection("127.0.0.1", sshd.port)
        with pytest.raises(asyncssh.ChannelOpenError, match="PTY"):
            await conn.create_process("saia-relay 1 ping", term_type="xterm")


AGENT = textwrap.dedent(
    """
    import asyncio, os, sys
    from pathlib import Path
    from hpc.config import AgentConfig
    from hpc.registry import BackendRegistry
    from hpc.router.server import serve_requests
    state = Path(sys.argv[1])
    with open(state / "agents.txt", "a") as out:
        out.write(f"{os.getpid()}\\n")
    asyncio.run(serve_requests(AgentConfig(state_dir=state), BackendRegistry()))
    """
)


def test_relay_starts_one_agent_for_concurrent_clients(tmp_path: Path) -> None:
    state = tmp_path / "state"
    code = tmp_path / "agent.py"
    code.write_text(AGENT)
    agent = [sys.executable, str(code), str(state)]
    with SshdSandbox(tmp_path / "ssh", state, agent=agent) as sshd:
        (state / ".keep").touch()
        argv = sshd.ssh_argv("saia-relay 1")
        clients = [
            subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(4)
        ]
        try:
            replies = [c.communicate(HELLO, timeout=60)[0] for c in clients]
            for reply in replies:
                assert wire.FrameDecoder().feed(reply)[0].type == wire.HELLO
            pids = (state / "agents.txt").read_text().split()
            assert len(pids) == 1
        finally:
            for pid in (state / "agents.txt").read_text().split():
                os.kill(int(pid), signal.SIGTERM)
            deadline = time.monotonic() + 10
            while (state / SOCKET_NAME).exists() and time.monotonic() < deadline:
                time.sleep(0.05)


def python38() -> str | None:
    """A real Python 3.8 interpreter (the oldest the login nodes may have), if installed."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates = [shutil.which("python3.8"), *map(str, pyenv.glob("3.8*/bin/python3.8"))]
    for candidate in filter(None, candidates):
        probe = [candidate, "-c", "import sys; print(sys.executable)"]
        done = subprocess.run(probe, capture_output=True, text=True, timeout=30, check=False)
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip()
    return None


async def test_relay_runs_on_python_3_8(tmp_path: Path) -> None:
    interpreter = python38()
    if interpreter is None:
        pytest.skip("no python3.8 on this machine")
    from hub.upstreams.hop_client import HopClient, HopTarget

    with SshdSandbox(tmp_path / "ssh", tmp_path / "state", python=interpreter) as sshd:
        assert f"{interpreter} -I -S" in sshd.authorized_keys.read_text()
        target = HopTarget(sshd.host, sshd.port, sshd.user, sshd.client_key, sshd.known_hosts)
        async with router(sshd), HopClient(target) as client:
            assert await client.services() == []
        refused = await asyncio.create_subprocess_exec(
            *sshd.ssh_argv("saia-relay 1; id"), stderr=asyncio.subprocess.PIPE
        )
        _, stderr = await asyncio.wait_for(refused.communicate(), 30)
        assert refused.returncode == 2
        assert stderr.decode().startswith("saia-relay: error: command refused")
