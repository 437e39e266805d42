"""One connection of the SSH hop: connecting, the relay handshake and the frame pump.

`connect(target, ...)` opens an SSH connection (or, for the demo's fallback, the agent's
local socket), starts the forced command's relay channel and exchanges HELLO; `Link.run()`
delivers the agent's frames to their streams until the channel ends. `hub/upstreams/hop_client.py`
keeps these links up and runs requests over them.

asyncssh reports a lost connection with its own exceptions (`ConnectionLost`, ...) where
the shared multiplexer (`saia.base.mux`) expects OSError: `SshPipe` translates, so that a
dropped connection ends the link like an EOF instead of escaping as a crash.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import asyncssh

from saia.base import protocol as wire
from saia.base.mux import Channel, StreamState

log = logging.getLogger(__name__)
SSH_WINDOW = 8 * 1024 * 1024
# AES-GCM first (then asyncssh's defaults): per packet one AESGCM call in `cryptography`
# where chacha20-poly1305 builds three cipher contexts in Python, and AES-NI makes it
# cheaper for sshd too. The hop sends thousands of packets per second.
ENCRYPTION_ALGS = "^aes128-gcm@openssh.com,aes256-gcm@openssh.com"
CLOSE_TIMEOUT = 5.0  # waiting for a closed connection to finish closing
# A connection can die without either end noticing (a dead NAT entry, a stopped relay or
# agent: sshd still answers SSH keepalives then). When requests wait on a link that sent
# nothing for PROBE_AFTER seconds, it is PINGed; nothing back within PROBE_TIMEOUT closes
# it, so its requests fail over (HopLost) and the slot reconnects, instead of hanging
# until their own timeouts or until SSH keepalive gives up (3 x 15 s, and never while sshd
# itself answers).
PROBE_AFTER = 5.0
PROBE_TIMEOUT = 10.0


class HopError(Exception):
    """The hop failed; `status` is the HTTP status the hub should answer with."""

    def __init__(self, message: str, status: int = 502) -> None:
        super().__init__(message)
        self.status = status


class HopUnavailable(HopError):
    """No usable connection, or it broke before the response started: safe to retry."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 503)


class HopLost(HopUnavailable):
    """The connection broke after the request was sent but before any of the response
    arrived: the request may be sent again once the client reconnected."""


class HopTimeout(HopError):
    def __init__(self, message: str) -> None:
        super().__init__(message, 504)


class Connection(Protocol):
    """What a Link needs of its transport: an SSH connection or a local socket writer."""

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...


@dataclass(frozen=True)
class HopTarget:
    """One login node; with `socket`, the agent's socket on this machine instead (no SSH:
    the demo's fallback where no sshd can be run)."""

    host: str
    port: int
    user: str
    client_key: Path
    known_hosts: Path
    command: str = "saia-relay 1"
    socket: Path | None = None
    connections: int = 1


class SshPipe:
    """The relay process's stdout and stdin as the multiplexer's reader and writer."""

    __slots__ = ("_stdin", "_stdout")

    def __init__(self, process: asyncssh.SSHClientProcess[bytes]) -> None:
        self._stdout = process.stdout
        self._stdin = process.stdin

    async def read(self, n: int = -1) -> bytes:
        try:
            return await self._stdout.read(n)
        except asyncssh.Error as error:  # ConnectionLost, DisconnectError, ...
            raise ConnectionResetError(str(error) or type(error).__name__) from error

    def write(self, data: bytes) -> None:
        try:
            self._stdin.write(data)
        except (OSError, asyncssh.Error) as error:
            # The connection is gone; the reader sees it too and ends the link.
            log.debug("write on a closed hop channel dropped: %s", error)

    async def drain(self) -> None:
        try:
            await self._stdin.drain()
        except asyncssh.Error as error:
            raise ConnectionResetError(str(error) or type(error).__name__) from error

    def close(self) -> None:
        self._stdin.close()


class Link:
    """One SSH connection and its relay channel."""

    def __init__(self, connection: Connection, channel: Channel) -> None:
        self.connection = connection
        self.channel = channel
        self._next_id = 0

    def open_stream(self) -> StreamState:
        self._next_id += 1
        return self.channel.open(self._next_id)

    async def run(self) -> None:
        """Deliver frames to their streams until the channel ends."""
        try:
            while (frames := await self.channel.next_frames()) is not None:
                for frame in frames:
                    self._deliver(frame)
        except wire.ProtocolError as error:
            log.warning("hop channel to the login node broke: %s", error)
        finally:
            self.channel.close()
            self.connection.close()

    async def watch(self, after: float = PROBE_AFTER, answer_within: float = PROBE_TIMEOUT) -> None:
        """Return when the link is closed, or after closing it because it went silent
        while streams were open and did not answer a PING within `answer_within`."""
        channel, tick = self.channel, min(after, answer_within) / 4
        probed_at: float | None = None
        while not channel.closed:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if probed_at is not None and channel.last_read >= probed_at:
                probed_at = None  # answered (a PONG, or anything else)
            if probed_at is None:
                if channel.streams and now - channel.last_read >= after:
                    probed_at = now
                    channel.send(wire.encode_frame(wire.PING, 0, bytes(8)))
            elif now - probed_at >= answer_within:
                log.warning(
                    "the login node sent nothing for %.0f s while %d requests waited, nor "
                    "answered a PING for %.0f s: closing the connection",
                    now - channel.last_read,
                    len(channel.streams),
                    answer_within,
                )
                channel.close()
                self.connection.close()
                return

    async def close(self) -> None:
        """Close the connection and wait (bounded) until it is closed."""
        self.channel.close()
        self.connection.close()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self.connection.wait_closed()
        except (TimeoutError, OSError, asyncssh.Error) as error:
            log.debug("hop connection did not close cleanly: %s", error)

    def _deliver(self, frame: wire.Frame) -> None:
        if frame.type not in (wire.RESPONSE, wire.DATA, wire.END, wire.ERROR):
            raise wire.ProtocolError(f"the agent sent {wire.describe(frame)}")
        if frame.stream == 0:  # channel-wide error from the agent
            raise wire.ProtocolError(wire.parse_error(frame.payload).message)
        state = self.channel.streams.get(frame.stream)
        if state is not None:
            state.inbox.put_nowait(frame)


async def connect(target: HopTarget, limit_s: float, keepalive_interval: float) -> Link:
    """A new link to the target's agent (SSH, or its local socket), HELLO exchanged."""
    if target.socket is not None:
        return await _connect_local(target.socket, limit_s)
    async with asyncio.timeout(limit_s):
        connection = await asyncssh.connect(
            target.host,
            target.port,
            username=target.user,
            client_keys=[str(target.client_key)],
            known_hosts=str(target.known_hosts),
            agent_path=None,
            config=None,
            preferred_auth="publickey",
            encryption_algs=ENCRYPTION_ALGS,
            keepalive_interval=keepalive_interval,
            keepalive_count_max=3,
        )
        try:
            return await _open_channel(connection, target.command)
        except BaseException:
            connection.close()
            raise


async def _connect_local(path: Path, limit_s: float) -> Link:
    async with asyncio.timeout(limit_s):
        reader, writer = await asyncio.open_unix_connection(str(path), limit=SSH_WINDOW)
        try:
            channel = Channel(reader, writer)
            channel.send(wire.encode_hello())
            version = await channel.read_hello()
        except BaseException:
            writer.close()
            raise
    if version != wire.VERSION:
        writer.close()
        raise HopUnavailable(f"the agent speaks protocol version {version}")
    return Link(writer, channel)


async def _open_channel(connection: asyncssh.SSHClientConnection, command: str) -> Link:
    process = await connection.create_process(command, encoding=None, window=SSH_WINDOW)
    pipe = SshPipe(process)
    channel = Channel(pipe, pipe)
    channel.send(wire.encode_hello())
    try:
        version = await channel.read_hello()
    except wire.ProtocolError:
        reason = await _first_line(process.stderr)
        raise HopUnavailable(f"the login node refused the hop: {reason}") from None
    if version != wire.VERSION:
        raise HopUnavailable(f"the agent speaks protocol version {version}")
    return Link(connection, channel)


async def _first_line(stream: asyncssh.SSHReader[bytes]) -> str:
    try:
        async with asyncio.timeout(2):
            data = await stream.read(4096)
    except (TimeoutError, OSError, asyncssh.Error):
        return "no reason given"
    text = data.decode("utf-8", "replace").strip().splitlines()
    return text[0][:300] if text else "no reason given"
