"""Waiting helpers of the hpc tests that run real jobs (local executor, Slurm, vLLM)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx
import pytest

from hpc.jobs.system import Endpoint, read_endpoint

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


async def wait_endpoint(state_dir: Path, job_id: str, limit_s: float = 60.0) -> Endpoint:
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
