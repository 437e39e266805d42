"""Waiting helpers of the hpc tests that run real jobs (local executor, Slurm, vLLM), and
the `saia` command run from async code."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx
import pytest

from hpc.jobs.system import Rendezvous, job_dir, read_endpoint

T = TypeVar("T")


async def until(check: Callable[[], T], limit_s: float, what: str, poll_s: float = 0.2) -> T:
    """Poll `check` (bounded) until it returns something truthy; fail with `what` otherwise."""
    try:
        async with asyncio.timeout(limit_s):
            while not (value := check()):  # noqa: ASYNC110 (polls state nothing signals)
                await asyncio.sleep(poll_s)
    except TimeoutError:
        pytest.fail(f"{what} within {limit_s:.0f} s")
    return value


async def saia(*args: str) -> tuple[int, str]:
    """Run `saia ...` (exit code, output) without blocking this loop (an agent under test
    may run on it)."""
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("saia")),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def wait_endpoint(state_dir: Path, job_id: str, limit_s: float = 60.0) -> Rendezvous:
    """The job's endpoint.json, once it has written it."""
    endpoint = await until(
        lambda: read_endpoint(state_dir, job_id), limit_s, "no endpoint.json", poll_s=0.1
    )
    assert endpoint is not None
    return endpoint


async def wait_healthy(
    client: httpx.AsyncClient, limit_s: float = 30.0, poll_s: float = 0.1
) -> None:
    """Until the server behind `client` answers GET /health with 200."""
    async with asyncio.timeout(limit_s):
        while True:
            try:
                if (await client.get("/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(poll_s)


def job_processes(state_dir: Path, job_id: str) -> list[str]:
    """Command lines of live processes of the job: SAIA_JOB_DIR (exported by the prologue)
    in their environment. Not SLURM_JOB_ID: other sandbox clusters on this machine reuse ids.
    """
    marker = f"SAIA_JOB_DIR={job_dir(state_dir, job_id)}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            if marker in environ:
                found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            continue  # gone meanwhile, or a kernel thread
    return found
