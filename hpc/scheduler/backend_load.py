"""A backend's own load figures, read from its vLLM Prometheus `GET /metrics`.

The router only counts the requests it forwards; vLLM also knows requests that reached it
by other paths and requests queued inside it. The health monitor reads these figures from
every ready backend once per round. A failed read is only a missing figure, never a
health failure: liveness is `/health`'s job.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import httpx

from hpc.scheduler.vllm_metrics import VllmLoad, parse_vllm_metrics


@dataclass(frozen=True)
class BackendLoad:
    """Requests a backend generates (running) and holds back (waiting); KV cache 0..1."""

    running: int
    waiting: int
    kv_cache_usage: float | None = None


@dataclass(frozen=True)
class LoadReading:
    """One `/metrics` read: the figures, or None and why not."""

    job_id: str
    load: BackendLoad | None
    problem: str = ""


def _count(value: float) -> int:
    return max(0, round(value))


def load_from_metrics(text: str, model_id: str) -> BackendLoad | None:
    """The figures of `model_id` in a `/metrics` text (of its only model when the served
    name differs); None when the text has no vLLM load figures."""
    loads = parse_vllm_metrics(text)
    found: VllmLoad | None = loads.get(model_id)
    if found is None and len(loads) == 1:
        found = next(iter(loads.values()))
    if found is None:
        return None
    return BackendLoad(_count(found.running), _count(found.waiting), found.kv_cache_usage)


async def read_load(
    client: httpx.AsyncClient,
    job_id: str,
    url: str,
    model_id: str,
    api_key: str | None,
    limit_s: float,
) -> LoadReading:
    """GET `<url>/metrics` within `limit_s`; never raises for a backend's failure."""
    try:
        async with asyncio.timeout(limit_s):
            headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
            response = await client.get(f"{url}/metrics", headers=headers)
            text = response.text
    except TimeoutError:
        return LoadReading(job_id, None, f"/metrics: no answer within {limit_s:g}s")
    except httpx.HTTPError as error:
        name = type(error).__name__
        return LoadReading(job_id, None, f"/metrics: {name}: {error}" if str(error) else name)
    if response.status_code != 200:
        return LoadReading(job_id, None, f"/metrics answered {response.status_code}")
    load = load_from_metrics(text, model_id)
    if load is None:
        return LoadReading(job_id, None, "/metrics has no vLLM load figures")
    return LoadReading(job_id, load)
