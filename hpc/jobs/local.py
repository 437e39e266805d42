"""`LocalJobSystem`: runs the same job scripts as Slurm would, on this machine, without Slurm.

Each job is `bash <script>` in its own session (process group) with the environment a
Slurm batch job gets (`SLURM_JOB_ID=local-<n>`, node list, `CUDA_VISIBLE_DEVICES` for its
GPUs), output to its log file, its time limit enforced (SIGTERM to the group at the
limit, SIGKILL after a grace). `<state_dir>/jobs/<id>/local.json` records each job, so a
restarted agent re-adopts jobs that still run (same pid AND same process start time).
Exits are watched with pidfds (Linux >= 5.3), which also works for adopted processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hpc.config import AgentConfig
from hpc.jobs.system import (
    JobInfo,
    JobTag,
    StartEstimate,
    Submission,
    job_dir,
    private_dir,
    write_atomic,
)
from saia.base.durations import parse_slurm_time

log = logging.getLogger(__name__)

RECORD = "local.json"
_LOCAL_ID = re.compile(r"^local-(\d+)$")
DEFAULT_LIMIT_S = 3600


class LocalJobError(RuntimeError):
    """A local job cannot be submitted or touched; str() says why."""


@dataclass(frozen=True)
class ScriptRequest:
    """What a job script asks for in its `#SBATCH` lines (the subset run locally)."""

    time_limit_s: int
    gpus: int
    nodes: int


def parse_sbatch_options(script: str) -> ScriptRequest:
    """Time limit, GPUs per node and node count from a script's leading `#SBATCH` lines."""
    options: dict[str, str] = {}
    for line in script.splitlines()[1:]:
        if line.strip() and not line.startswith("#"):
            break  # sbatch stops reading options at the first command, so do we
        if not line.startswith("#SBATCH"):
            continue
        for word in shlex.split(line[len("#SBATCH") :], comments=True):
            name, _, value = word.partition("=")
            options[name] = value
    try:
        limit = parse_slurm_time(options["--time"]) if "--time" in options else DEFAULT_LIMIT_S
        gres = options.get("--gres", "")
        gpus = int(gres.rsplit(":", 1)[1]) if gres.startswith("gpu") and ":" in gres else 0
        nodes = int(options.get("--nodes", "1"))
    except ValueError as error:
        raise LocalJobError(f"job script options: {error}") from None
    return ScriptRequest(time_limit_s=limit or DEFAULT_LIMIT_S, gpus=gpus, nodes=nodes)


def spawn_job_shell(
    script: Path, log_path: Path, cwd: Path, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    """`bash script` in a new session, output to the log.

    Popen rather than asyncio's subprocess on purpose: a job must outlive the agent, and
    asyncio kills a child whose transport is closed. Fork and exec take milliseconds.
    """
    with open(log_path, "wb") as output:
        return subprocess.Popen(
            ["bash", str(script)],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )


def process_start_ticks(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), None when it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    # Field 22, counted after the command name, which may itself contain spaces.
    return int(stat.rpartition(")")[2].split()[19])


@dataclass
class LocalRecord:
    """One local job as persisted in local.json."""

    job_id: str
    service: str
    job_name: str
    prefix: str
    agent_id: str
    pid: int
    pgid: int
    proc_start: int
    start: float
    limit_s: int
    gpus: list[int] = field(default_factory=list)
    host: str = ""

    def ours(self, tag: JobTag) -> bool:
        return (self.prefix, self.agent_id) == (tag.prefix, tag.agent_id)


class LocalJob:
    """A running local job: its record, a pidfd and one future for its exit."""

    def __init__(self, record: LocalRecord, proc: subprocess.Popen[bytes] | None) -> None:
        self.record = record
        self.proc = proc  # None for an adopted job (not our child)
        self.stopping = False
        self.pidfd = os.pidfd_open(record.pid)
        loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[None] = loop.create_future()
        loop.add_reader(self.pidfd, self._on_exit)

    def _on_exit(self) -> None:
        asyncio.get_running_loop().remove_reader(self.pidfd)
        if not self.exited.done():
            self.exited.set_result(None)

    async def wait_exit(self, seconds: float) -> bool:
        """True once the job's shell has exited; False after `seconds`."""
        try:
            await asyncio.wait_for(asyncio.shield(self.exited), max(0.0, seconds))
        except TimeoutError:
            return False
        return True

    def signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.record.pgid, signum)

    def finish(self) -> int | None:
        """After the exit: kill what is left of the group, reap the shell; its exit code."""
        self.signal_group(signal.SIGKILL)
        code = self.proc.poll() if self.proc is not None else None
        self.close()
        return code

    def close(self) -> None:
        """Stop watching (the job itself is left alone)."""
        if self.pidfd < 0:
            return
        if not self.exited.done():
            asyncio.get_running_loop().remove_reader(self.pidfd)
            self.exited.cancel()
        os.close(self.pidfd)
        self.pidfd = -1


class LocalJobSystem:
    """`hpc.jobs.system.JobSystem` for a machine without Slurm; jobs outlive the agent."""

    def __init__(
        self, config: AgentConfig, tag: JobTag, *, gpu_count: int = 0, kill_grace: float = 30.0
    ) -> None:
        self._config = config
        self._tag = tag
        self._gpu_count = gpu_count
        self._kill_grace = kill_grace
        self._host = socket.gethostname()
        self._jobs: dict[str, LocalJob] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._adopted = False
        private_dir(config.state_dir)
        self._jobs_dir = private_dir(config.state_dir / "jobs")

    # -- JobSystem ------------------------------------------------------------------------
    async def submit(self, submission: Submission) -> str:
        self._adopt_once()
        request = parse_sbatch_options(submission.script)
        if request.nodes != 1:
            raise LocalJobError("the local executor runs single-node jobs only")
        gpus = self._allocate_gpus(request.gpus)
        job_id = self._new_job_id()
        folder = job_dir(self._config.state_dir, job_id)
        script = folder / "job.sh"
        script.write_text(submission.script, encoding="utf-8")
        log_path = Path(str(submission.log_path).replace("%j", job_id))
        env = self._job_env(submission, job_id, gpus)
        proc = spawn_job_shell(script, log_path, self._config.state_dir, env)
        record = LocalRecord(
            job_id=job_id,
            service=submission.service,
            job_name=submission.job_name,
            prefix=self._tag.prefix,
            agent_id=self._tag.agent_id,
            pid=proc.pid,
            pgid=proc.pid,  # the shell leads its own session and group
            proc_start=process_start_ticks(proc.pid) or 0,
            start=time.time(),
            limit_s=request.time_limit_s,
            gpus=gpus,
            host=self._host,
        )
        write_atomic(folder / RECORD, json.dumps(asdict(record)))
        self._watch(LocalJob(record, proc))
        log.info("started local job %s for %s (pid %d)", job_id, submission.service, proc.pid)
        return job_id

    async def list_jobs(self) -> list[JobInfo]:
        self._adopt_once()
        now = time.time()
        return [self._info(job, now) for job in self._jobs.values() if not job.exited.done()]

    async def cancel(self, job_id: str) -> None:
        """SIGTERM to the job's process group now, SIGKILL after the grace."""
        self._adopt_once()
        if not _LOCAL_ID.fullmatch(job_id):
            raise LocalJobError(f"{job_id!r} is not a local job id")
        job = self._jobs.get(job_id)
        if job is None:
            record = read_record(self._config.state_dir, job_id)
            if record is not None and not record.ours(self._tag):
                raise LocalJobError(f"job {job_id} is not one of this agent's jobs")
            return  # already gone
        if not job.stopping:
            self._spawn(self._stop(job, "cancelled"))

    async def expected_starts(self, job_ids: Sequence[str]) -> dict[str, float | None]:
        """None pending: a local job starts when it is submitted."""
        return {}

    async def test_start(self, submission: Submission) -> StartEstimate:
        """Now, on this machine: a local job starts when it is submitted."""
        return StartEstimate(time.time(), (socket.gethostname(),), submission.partition)

    async def aclose(self) -> None:
        """Stop watching; the jobs keep running and a new LocalJobSystem adopts them."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for job in self._jobs.values():
            job.close()
        self._jobs.clear()

    # -- helpers --------------------------------------------------------------------------
    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _watch(self, job: LocalJob) -> None:
        self._jobs[job.record.job_id] = job
        self._spawn(self._supervise(job))

    async def _supervise(self, job: LocalJob) -> None:
        record = job.record
        if not await job.wait_exit(record.start + record.limit_s - time.time()):
            await self._stop(job, "time limit reached")
        await asyncio.shield(job.exited)
        code = job.finish()
        del self._jobs[record.job_id]
        log.info("local job %s ended (exit code %s)", record.job_id, code)

    async def _stop(self, job: LocalJob, why: str) -> None:
        job.stopping = True
        log.info("stopping local job %s: %s", job.record.job_id, why)
        job.signal_group(signal.SIGTERM)
        if not await job.wait_exit(self._kill_grace):
            log.warning(
                "local job %s ignored SIGTERM for %.0fs: SIGKILL",
                job.record.job_id,
                self._kill_grace,
            )
            job.signal_group(signal.SIGKILL)

    def _adopt_once(self) -> None:
        """Watch this agent's jobs that a previous LocalJobSystem started and that still run."""
        if self._adopted:
            return
        self._adopted = True
        for path in sorted(self._jobs_dir.glob(f"local-*/{RECORD}")):
            record = read_record(self._config.state_dir, path.parent.name)
            if record is None or not record.ours(self._tag) or record.job_id in self._jobs:
                continue
            if not _same_process(record):
                continue  # gone, or the pid now belongs to another process
            try:
                job = LocalJob(record, None)
            except ProcessLookupError:
                continue
            log.info("adopted local job %s (pid %d)", record.job_id, record.pid)
            self._watch(job)

    def _allocate_gpus(self, count: int) -> list[int]:
        if count == 0 or self._gpu_count == 0:
            return []
        used = {gpu for job in self._jobs.values() for gpu in job.record.gpus}
        free = [gpu for gpu in range(self._gpu_count) if gpu not in used]
        if len(free) < count:
            raise LocalJobError(f"{count} GPU(s) requested, {len(free)} of {self._gpu_count} free")
        return free[:count]

    def _new_job_id(self) -> str:
        """`local-<n>`, one above every id used in this state dir; its folder is created."""
        numbers = [
            int(m.group(1)) for p in self._jobs_dir.iterdir() if (m := _LOCAL_ID.match(p.name))
        ]
        number = max(numbers, default=0) + 1
        while True:
            try:
                job_dir(self._config.state_dir, f"local-{number}").mkdir(mode=0o700)
            except FileExistsError:
                number += 1
                continue
            return f"local-{number}"

    def _job_env(self, submission: Submission, job_id: str, gpus: list[int]) -> dict[str, str]:
        """The agent's environment without its own SLURM_*, plus what Slurm gives a job."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env.update(submission.environment)
        env.update(
            SLURM_JOB_ID=job_id,
            SLURM_JOBID=job_id,
            SLURM_JOB_NAME=submission.job_name,
            SLURM_JOB_NODELIST=self._host,
            SLURM_NODELIST=self._host,
            SLURM_JOB_NUM_NODES="1",
            SLURM_NNODES="1",
            SLURM_SUBMIT_DIR=str(self._config.state_dir),
        )
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(gpu) for gpu in gpus)
            env["SLURM_JOB_GPUS"] = env["CUDA_VISIBLE_DEVICES"]
        return env

    def _info(self, job: LocalJob, now: float) -> JobInfo:
        record = job.record
        return JobInfo(
            job_id=record.job_id,
            service=record.service,
            state="COMPLETING" if job.stopping else "RUNNING",
            time_limit_s=record.limit_s,
            time_left_s=max(0, int(record.start + record.limit_s - now)),
            start_time=record.start,
            submit_time=record.start,
            nodes=(record.host,),
            reason="",
        )


def _same_process(record: LocalRecord) -> bool:
    """The recorded job shell still runs: same pid, start time and process group."""
    if process_start_ticks(record.pid) != record.proc_start:
        return False
    try:
        return os.getpgid(record.pid) == record.pgid
    except ProcessLookupError:
        return False


def read_record(state_dir: Path, job_id: str) -> LocalRecord | None:
    """A job's local.json, or None when missing or unreadable."""
    if not _LOCAL_ID.fullmatch(job_id):
        return None
    try:
        data = json.loads((job_dir(state_dir, job_id) / RECORD).read_text(encoding="utf-8"))
        return LocalRecord(**data)
    except (OSError, ValueError, TypeError):
        return None
