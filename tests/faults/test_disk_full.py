"""Fault h: the state directory's file system full, under load (issue 9).

The chain's state dir is on a small tmpfs of its own (mounted for this module, unmounted
in a finally). A file fills it up; the agent cannot write its state or status and its
jobs cannot write their logs, yet every request is answered. The agent logs the failure
once, `saia hpc status` says the disk is full, the files written before stay whole (each
write is atomic: no half file, no temporary left), and once the filler is removed the
agent writes its state and status again and logs that it recovered.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpc.scheduler.state import AgentState, agent_id, load_state
from hpc.scheduler.status import read_status
from saia.sandbox.slurm import SlurmSandbox
from tests.faults.chain import FaultChain, running
from tests.faults.load import loaded
from tests.faults.report import build_report, check_targets, wait_steady
from tests.hpc.helpers import until

SIZE = "32m"
FULL_S = 8.0  # how long the disk stays full after the agent noticed
COMMAND_TIMEOUT = 30.0


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    mounted = _run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)])
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (root needed): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        if _run(["umount", str(path)]).returncode != 0:  # still in use: detach it
            _run(["umount", "--lazy", str(path)])


@pytest.fixture(scope="module")
def fault_chain(
    slurm_cluster: SlurmSandbox, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FaultChain]:
    """The suite's chain, with its state dir on a tmpfs of its own."""
    root = tmp_path_factory.mktemp("chain")
    with tmpfs(root / "statefs", SIZE) as mounted:
        chain = FaultChain(root, slurm_cluster, [{"name": "faulty"}])
        chain.state_dir = mounted / "state"
        with running(chain):
            yield chain


def fill(path: Path) -> None:
    """Write zeros into `path` until the file system has no space left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for size in (1024 * 1024, 4096):  # big blocks, then the last partial ones
            with contextlib.suppress(OSError):
                while os.write(fd, bytes(size)):
                    pass
    finally:
        os.close(fd)
    assert os.statvfs(path.parent).f_bavail == 0


async def saia_status(chain: FaultChain) -> tuple[int, str]:
    argv = [sys.executable, "-m", "saia", "hpc", "status", "-c", str(chain.root / "agent.yaml")]
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    async with asyncio.timeout(COMMAND_TIMEOUT):
        output, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


def whole_state(state_dir: Path) -> AgentState:
    """The saved state; StateError if the file were cut short or corrupt."""
    return load_state(state_dir, agent_id(state_dir))


def logged(chain: FaultChain, text: str) -> int:
    return (chain.root / "agent.log").read_text(errors="replace").count(text)


async def test_state_dir_full_serving_goes_on(fault_chain: FaultChain) -> None:
    state, back = await wait_steady(fault_chain)
    assert back, f"the chain is not steady before the fault: {state}"
    (job,) = await fault_chain.running_jobs("faulty")
    state_dir, loop = fault_chain.state_dir, asyncio.get_running_loop()
    filler = state_dir.parent / "filler"
    load = fault_chain.load("faulty", clients=6, duration=FULL_S + 12)
    async with loaded(load) as result:
        await until(lambda: len(result.pending(answered=True)) >= 2, 30, "no load in flight")
        fill(filler)
        try:
            await until(lambda: logged(fault_chain, "cannot write the agent state"), 30, "no log")
            code, output = await saia_status(fault_chain)
            print(f"  saia hpc status while full: {output.strip().splitlines()[-1]}")
            assert code == 0 and "bytes free: the agent cannot write its state" in output
            await asyncio.sleep(FULL_S)  # the outage itself, not a wait for something
            assert job in whole_state(state_dir).jobs  # what was written before is whole
            assert [j.job_id for j in read_status(state_dir).jobs] == [job]
        finally:
            filler.unlink()
        freed_at = loop.time()
        await until(lambda: logged(fault_chain, "state is written again"), 30, "no recovery")
        await until(lambda: read_status(state_dir).error == "", 30, "the status shows an error")
        print(f"  state and status written again {loop.time() - freed_at:.1f}s after")
    report = await build_report(fault_chain, "h. state dir full", result, fault_at=freed_at)
    check_targets(report, result, died_at=None)  # no backend died: no stream may fail
    assert logged(fault_chain, "cannot write the agent state") == 1
    assert [p.name for p in state_dir.glob(".*.tmp")] == []  # atomic writes left none
    assert job in whole_state(state_dir).jobs
    assert await fault_chain.running_jobs("faulty") == [job]
