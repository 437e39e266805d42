"""Which job folders and logs under `<state_dir>/jobs/` may go: a pure decision.

Every job leaves `<state_dir>/jobs/<id>/` (endpoint, key, certificate, `job.log` link and,
by default, vLLM's compile cache `vllm-cache/`, often hundreds of MB) and the flat log
`<state_dir>/jobs/<id>.log`. Nothing else removes them, so without this the state dir (often
on a quota-limited shared file system) grows with every renewal until new jobs cannot write
their endpoint file.

The rule (docs/operations.md, "State directory"):
- never anything of a job Slurm still lists or the agent still tracks (pending, running,
  draining, adopted): the caller passes their ids as `kept`;
- the compile cache of an ended job goes first (large and regenerable) once the job's
  files are `CACHE_GRACE` old (or `retention`, if shorter);
- the folder and the log go once the job's files are `retention` old, oldest first, so
  `saia hpc logs JOB` works for that long after the job ended.
A job's age is that of its log (its last output; Slurm rewrites it when a job id is
reused), or of its folder once the log is gone: removing the cache changes the folder's
time, the log's never.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Literal

CACHE_DIR = "vllm-cache"  # slurm/common.sh: VLLM_CACHE_ROOT's default in the job folder
CACHE_GRACE = 600.0  # seconds an ended job's cache stays: room for a requeue to be listed
MAX_REMOVALS = 200  # per round; the rest waits for the next round

What = Literal["cache", "folder", "log"]


@dataclass(frozen=True)
class JobFiles:
    """What one job id has under `<state_dir>/jobs/` (entries not followed if links)."""

    job_id: str
    last_change: float  # mtime of the log, or of the folder without a log (lstat)
    folder: bool = False  # `<id>` exists (a folder, or a link, which is removed as a link)
    log: bool = False  # `<id>.log` exists
    cache: bool = False  # `<id>/vllm-cache` exists in a real folder


@dataclass(frozen=True)
class Removal:
    job_id: str
    what: What
    name: str  # relative to `<state_dir>/jobs/`
    last_change: float  # as planned: the remover skips it if the job changed since


def cache_name(job_id: str) -> str:
    return f"{job_id}/{CACHE_DIR}"


def plan_removals(
    found: Iterable[JobFiles],
    kept: Collection[str],
    now: float,
    retention: float,
    limit: int = MAX_REMOVALS,
) -> list[Removal]:
    """The removals due now: caches of ended jobs first, then old folders and logs (oldest
    first), at most `limit` in all."""
    ended = sorted((f for f in found if f.job_id not in kept), key=lambda f: f.last_change)
    old = [f for f in ended if now - f.last_change >= retention]
    going = {f.job_id for f in old if f.folder}
    cache_age = min(CACHE_GRACE, retention)
    caches = [
        Removal(f.job_id, "cache", cache_name(f.job_id), f.last_change)
        for f in ended
        if f.cache and f.job_id not in going and now - f.last_change >= cache_age
    ]
    rest: list[Removal] = []
    for f in old:
        if f.folder:
            rest.append(Removal(f.job_id, "folder", f.job_id, f.last_change))
        if f.log:
            rest.append(Removal(f.job_id, "log", f"{f.job_id}.log", f.last_change))
    return [*caches, *rest][: max(0, limit)]
