"""What every sandbox shares: stopping exactly its own child by pid, free ports, `with`."""

from __future__ import annotations

import signal
import socket
import subprocess

from saia.sandbox.process import Sandbox, free_port, stop_process

# Reports it is ready once its TERM trap is set (a signal before that would end it early).
STUBBORN = ["bash", "-c", "trap '' TERM; echo ready; while :; do sleep 0.1; done"]


def test_stop_sends_the_signal_and_returns_the_exit_code() -> None:
    process = subprocess.Popen(["sleep", "30"])
    assert stop_process(process, 5) == -signal.SIGTERM
    other = subprocess.Popen(["sleep", "30"])
    assert stop_process(other, 5, stop_signal=signal.SIGINT) == -signal.SIGINT
    assert stop_process(other, 5) == -signal.SIGINT  # already gone: nothing sent


def test_a_process_ignoring_sigterm_is_killed_after_the_grace() -> None:
    process = subprocess.Popen(STUBBORN, stdout=subprocess.PIPE)
    assert process.stdout is not None and process.stdout.readline() == b"ready\n"
    assert stop_process(process, 0.5, kill_wait=5) == -signal.SIGKILL
    process.stdout.close()


def test_free_port_can_be_bound_on_loopback() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


class Counting(Sandbox):
    def __init__(self) -> None:
        self.events: list[str] = []

    def start(self) -> None:
        self.events.append("start")

    def stop(self) -> None:
        self.events.append("stop")


def test_with_starts_and_stops_even_on_error() -> None:
    sandbox = Counting()
    try:
        with sandbox as entered:
            assert entered is sandbox and sandbox.events == ["start"]
            raise RuntimeError("test body failed")
    except RuntimeError:
        pass
    assert sandbox.events == ["start", "stop"]
