"""The leader lock: one holder, a standby that takes over, release on process death."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import pytest

from hpc.scheduler.leader import LeaderLock

HOLDER = """
import sys, time
from filelock import FileLock
lock = FileLock(sys.argv[1], thread_local=False)
lock.acquire(timeout=0)
print("held", flush=True)
time.sleep(60)
"""


async def test_second_lock_waits_as_standby_until_release(tmp_path: Path) -> None:
    path = tmp_path / "agent.lock"
    first = LeaderLock(path, poll_interval=0.05)
    await first.acquire()
    second = LeaderLock(path, poll_interval=0.05)
    waiter = asyncio.create_task(second.acquire())
    await asyncio.sleep(0.3)
    assert not waiter.done() and not second.held
    first.release()
    await asyncio.wait_for(waiter, 5)
    assert second.held and not first.try_acquire()
    second.release()


async def test_standby_is_cancellable_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hpc.scheduler.leader")
    path = tmp_path / "agent.lock"
    async with LeaderLock(path):
        standby = asyncio.create_task(LeaderLock(path, poll_interval=0.02).acquire())
        await asyncio.sleep(0.2)
        standby.cancel()
        await asyncio.gather(standby, return_exceptions=True)
    assert standby.cancelled()
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count(f"standby: another agent holds {path}") == 1


async def test_lock_is_released_when_the_holder_process_dies(tmp_path: Path) -> None:
    path = tmp_path / "agent.lock"
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLDER, str(path), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert holder.stdout is not None
        assert (await asyncio.wait_for(holder.stdout.readline(), 10)).strip() == b"held"
        lock = LeaderLock(path, poll_interval=0.05)
        assert not lock.try_acquire()
        holder.kill()
        async with asyncio.timeout(5):
            await lock.acquire()
        assert lock.held
        lock.release()
    finally:
        if holder.returncode is None:
            holder.kill()
        await holder.wait()
