"""Faults of the hop between hub and agent, under load through the whole chain (issue 9).

c. the agent SIGKILLed: the hub's connection drops with it, the hub reconnects, the relay
   starts a new agent, which adopts the running job (no second job); requests not yet
   answered are sent again on the new connection and answered;
d. the hub's SSH connection dropped (its sshd session process SIGKILLed), after sshd was
   restarted (a new listener on the same port; open sessions stay): the hub reconnects at
   once and sends the unanswered requests again.

Only streams whose answer had started when the connection broke may fail (mid-stream:
they cannot be replayed). Each test prints how long the chain took to answer again.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

from tests.faults.chain import FaultChain
from tests.faults.load import LoadResult, loaded, streams_started
from tests.faults.report import build_report, check_targets, wait_steady
from tests.hpc.helpers import until

LOAD_S = 10.0
RESTORE_LIMIT = 60.0


def answered_again_after(result: LoadResult, moment: float) -> str:
    """Seconds from `moment` until the first answer (200 head) that came after it."""
    heads = [o.answered for o in result.outcomes if o.answered and o.answered > moment]
    return f"{min(heads) - moment:.2f}s" if heads else "never"


def leader_pid(state_dir: Path) -> int | None:
    try:
        pid = int((state_dir / "agent.pid").read_text())
    except (OSError, ValueError):
        return None
    return pid if Path(f"/proc/{pid}").exists() else None


async def steady_job(chain: FaultChain) -> str:
    state, back = await wait_steady(chain)
    assert back, f"the chain is not steady before the fault: {state}"
    (job,) = await chain.running_jobs("faulty")
    return job


@contextlib.asynccontextmanager
async def relays_start_no_agent(state_dir: Path) -> AsyncIterator[None]:
    """Hold the lock a relay takes to start an agent: meanwhile a relay waits, then
    connects to whichever agent listens by then (cloud_interface/relay.py)."""
    fd = os.open(state_dir / "relay-start.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        await until(lambda: _try_lock(fd), 30, "a relay holds its start lock")
        yield
    finally:
        os.close(fd)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


async def own_agent_again(chain: FaultChain) -> None:
    """After the relay started an agent: lead with a chain-owned agent again.

    The relay's agent runs without --drain-on-exit (as in production); the chain stops
    only its own agent with a drain. So a new chain agent stands by, the relay's agent
    is stopped by its pid (SIGTERM: it leaves the job), and the standby adopts the job;
    meanwhile no relay may start yet another agent.
    """
    relay_agent = leader_pid(chain.state_dir)
    assert relay_agent is not None
    log = chain.root / "agent.log"
    standbys = log.read_text(errors="replace").count("standby:")
    config = str(chain.root / "agent.yaml")
    argv = [sys.executable, "-m", "saia", "hpc", "agent", "-c", config, "--drain-on-exit"]
    chain._spawn("agent", argv)
    own = chain.processes["agent"].pid
    await until(
        lambda: log.read_text(errors="replace").count("standby:") > standbys,
        RESTORE_LIMIT,
        "the new agent did not stand by",
    )
    async with relays_start_no_agent(chain.state_dir):
        os.kill(relay_agent, signal.SIGTERM)
        await until(lambda: leader_pid(chain.state_dir) == own, RESTORE_LIMIT, "no take-over")
        await until(lambda: listening(chain.state_dir / "agent.sock"), RESTORE_LIMIT, "socket")
    state, back = await wait_steady(chain)
    assert back, f"not steady after the take-over: {state}"


async def test_agent_killed_relay_starts_a_new_one(fault_chain: FaultChain) -> None:
    job = await steady_job(fault_chain)
    load = fault_chain.load("faulty", clients=8, duration=LOAD_S)
    loop = asyncio.get_running_loop()
    agent = fault_chain.processes["agent"]
    async with loaded(load) as result:
        await streams_started(result)
        agent.send_signal(signal.SIGKILL)
        died_at = loop.time()
    report = await build_report(fault_chain, "c. agent SIGKILLed", result, died_at)
    print(f"  answering again {answered_again_after(result, died_at)} after the kill")
    check_targets(report, result, died_at)
    assert agent.wait(10) == -signal.SIGKILL
    assert await fault_chain.running_jobs("faulty") == [job], "the job was not adopted"
    new_agent = leader_pid(fault_chain.state_dir)
    assert new_agent not in (None, agent.pid)
    await own_agent_again(fault_chain)


async def test_ssh_session_killed_after_sshd_restart(fault_chain: FaultChain) -> None:
    sshd = fault_chain.sshd
    assert sshd is not None
    await steady_job(fault_chain)
    load = fault_chain.load("faulty", clients=8, duration=LOAD_S)
    loop = asyncio.get_running_loop()
    async with loaded(load) as result:
        await streams_started(result)
        sessions = sshd.session_pids()  # the hub's connection: stays through the restart
        started = time.monotonic()
        sshd.restart()  # blocks the load's loop briefly (well under a second)
        print(f"  sshd restarted in {time.monotonic() - started:.2f}s")
        await streams_started(result)
        for pid in sessions:
            os.kill(pid, signal.SIGKILL)
        dropped_at = loop.time()
    assert sessions and not set(sessions) & set(sshd.session_pids())
    report = await build_report(fault_chain, "d. SSH session killed", result, dropped_at)
    print(f"  answering again {answered_again_after(result, dropped_at)} after the drop")
    check_targets(report, result, dropped_at)
    assert report.mid_stream >= 1, "the kill broke no stream: it did not hit"
