"""The agent's pruner of `<state_dir>/jobs/`: scan, decide (`job_folders.plan_removals`),
remove. One task of the agent's TaskGroup, a round at start and then once an hour.

Each round lists the jobs itself (Slurm's word at decision time, plus every job the agent
tracks): a folder of a job either knows is never touched, and a round whose listing fails
removes nothing. Just before each removal it looks again (the agent may have adopted the
job meanwhile, or a reused job id may have written there), so a plan never outlives a change.

Removal never leaves `<state_dir>/jobs/`: a path whose parent does not resolve there is left
alone, links (a job could plant one to anywhere) are unlinked and never followed, and
folders go by `rm -rf -- PATH` (argv, exit code, timeout; rm does not follow links) so a
large compile cache never blocks the event loop. A round has a time budget; failures are
logged once until a round succeeds again, and shown in `saia hpc status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

from hpc.jobs.system import JobSystem
from hpc.scheduler.job_folders import CACHE_DIR, JobFiles, Removal, plan_removals
from hpc.scheduler.live import LiveState
from hpc.scheduler.status import JOB_ID

log = logging.getLogger(__name__)

PRUNE_INTERVAL = 3600.0  # seconds between rounds (read at run time: tests shorten it)
RETRY_INTERVAL = 300.0  # after a round that could not list the jobs
ROUND_BUDGET = 120.0  # seconds one round may take; the rest waits for the next round
RM_TIMEOUT = 60.0  # per `rm -rf`
SCAN_STEP = 100  # entries read between two yields to the event loop


class JobFolderPruner:
    """Prunes `<state_dir>/jobs/` of ended jobs; `error` is the last round's problem."""

    def __init__(self, live: LiveState, jobs: JobSystem, clock: Callable[[], float]) -> None:
        self.live, self.jobs, self.clock = live, jobs, clock
        self.error = ""  # what status shows; "" after a round without problems
        self.removed = 0  # entries removed since start

    async def run(self) -> None:
        """Until cancelled: a round now, then one every PRUNE_INTERVAL."""
        while True:
            listed = await self.prune_once()
            await asyncio.sleep(PRUNE_INTERVAL if listed else RETRY_INTERVAL)

    async def prune_once(self) -> bool:
        """One round; False when the job list could not be read (nothing was removed)."""
        now, config = self.clock(), self.live.config
        try:
            async with asyncio.timeout(config.slurm_timeout + 5):
                listed = await self.jobs.list_jobs()
        except Exception as error:  # the loop logs and shows Slurm outages already
            log.info("job folders not pruned: cannot list the jobs: %s", error)
            return False
        kept = {info.job_id for info in listed} | set(self.live.jobs)
        root = config.state_dir / "jobs"
        try:
            async with asyncio.timeout(ROUND_BUDGET):
                problems = await self._round(root, kept, now)
        except TimeoutError:
            problems = [f"pruning took over {ROUND_BUDGET:.0f} s; the rest waits"]
        except OSError as error:
            problems = [f"cannot read the folder: {error.strerror or error}"]
        self._report(root, problems)
        return True

    async def _round(self, root: Path, kept: set[str], now: float) -> list[str]:
        retention = self.live.config.job_retention
        removals = plan_removals(await scan(root), kept, now, retention)
        problems, counts = list[str](), dict.fromkeys(("cache", "folder", "log"), 0)
        failed: set[str] = set()
        for removal in removals:
            if removal.job_id in self.live.jobs or not still_due(root, removal):
                continue  # adopted or written to since the plan: not ended after all
            if removal.job_id in failed:
                continue  # its log stays: the job's age for the next round
            problem = await remove(root, removal.name, RM_TIMEOUT)
            if problem:
                problems.append(problem)
                failed.add(removal.job_id)
            else:
                counts[removal.what] += 1
        if any(counts.values()):
            self.removed += sum(counts.values())
            log.info(
                "pruned %s: %d compile caches, %d job folders, %d logs",
                root, counts["cache"], counts["folder"], counts["log"],
            )  # fmt: skip
        return problems

    def _report(self, root: Path, problems: list[str]) -> None:
        """Logged once until a round has no problem again; status shows the last one."""
        if not problems:
            if self.error:
                log.warning("job folders under %s are pruned again", root)
            self.error = ""
            return
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        message = f"cannot prune {root}: {problems[0]}{more}"
        if not self.error:
            log.warning("%s; retrying every %.0f s", message, PRUNE_INTERVAL)
        self.error = message


async def scan(root: Path) -> list[JobFiles]:
    """The job ids with files under `root`, nothing followed; other names are left alone."""
    times: dict[str, dict[str, float]] = {}  # job id -> {"log"|"folder": mtime}
    caches: set[str] = set()
    try:
        listing = os.scandir(root)
    except FileNotFoundError:  # no job ever ran here
        return []
    with listing as entries:
        for count, entry in enumerate(entries):
            if count % SCAN_STEP == SCAN_STEP - 1:
                await asyncio.sleep(0)  # a folder of many thousand entries: let others run
            is_log = entry.name.endswith(".log")
            job_id = entry.name.removesuffix(".log")
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not JOB_ID.match(job_id) or (is_log and stat.S_ISDIR(info.st_mode)):
                continue  # not a job's: left alone
            times.setdefault(job_id, {})["log" if is_log else "folder"] = info.st_mtime
            if not is_log and _has_cache(root, job_id, info):
                caches.add(job_id)
    return [_files(job_id, mtimes, job_id in caches) for job_id, mtimes in times.items()]


def _files(job_id: str, mtimes: dict[str, float], cache: bool) -> JobFiles:
    # The log's time is the job's last output; the folder's changes with our own removals
    # (a cache removed, an rm cut short), so it counts only when the log is gone.
    changed = mtimes.get("log", mtimes.get("folder", 0.0))
    return JobFiles(job_id, changed, "folder" in mtimes, "log" in mtimes, cache)


def _has_cache(root: Path, job_id: str, folder: os.stat_result) -> bool:
    if not stat.S_ISDIR(folder.st_mode):  # a link or a file: no cache of ours inside
        return False
    return os.path.lexists(root / job_id / CACHE_DIR)


def last_change(root: Path, job_id: str) -> float | None:
    """The job's age as `scan` reads it (log, else folder; not followed); None: neither."""
    for name in (f"{job_id}.log", job_id):
        with contextlib.suppress(FileNotFoundError):
            return os.lstat(root / name).st_mtime
    return None


def still_due(root: Path, removal: Removal) -> bool:
    """Nothing of the job changed since the plan (a reused job id would have)."""
    now = last_change(root, removal.job_id)
    return now is not None and now <= removal.last_change


def inside(root: Path, path: Path) -> bool:
    """`path` is an entry of `root` or of one of its folders, with no link on the way."""
    top = root.resolve()
    parent = path.parent.resolve()
    return path.name not in ("", ".", "..") and top in (parent, parent.parent)


async def remove(root: Path, name: str, limit_s: float) -> str:
    """Remove `root/name` (a link as a link); "" when it is gone, else why not."""
    path = root / name
    if not inside(root, path):
        return f"{path} leads out of {root}: left alone"
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return ""
    if stat.S_ISDIR(mode):
        return await remove_tree(path, limit_s)
    try:
        os.unlink(path)  # a file, or a link: never followed
    except FileNotFoundError:
        pass
    except OSError as error:
        return f"cannot remove {path}: {error.strerror or error}"
    return ""


async def remove_tree(path: Path, limit_s: float) -> str:
    """`rm -rf -- PATH` in a subprocess (killed on timeout or cancellation)."""
    proc = await asyncio.create_subprocess_exec(
        "rm", "-rf", "--", str(path),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(limit_s):
            _, stderr = await proc.communicate()
    except BaseException as error:  # timeout or cancellation: never leave rm running
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        if isinstance(error, TimeoutError):
            return f"rm -rf {path}: no answer within {limit_s:.0f} s"
        raise
    if proc.returncode != 0:
        lines = stderr.decode(errors="replace").strip().splitlines()
        return f"rm -rf {path}: exit {proc.returncode}: {lines[0] if lines else 'no message'}"
    return ""
