"""`SlurmJobSystem`: the agent's jobs through Slurm's command-line tools (sbatch/squeue/scancel).

Every call is an argv list with a timeout (`config.slurm_timeout`) and is judged by its
exit code; a failure becomes a `SlurmError` carrying the first line of Slurm's message.
Only jobs whose name is `<prefix>-<service>` AND whose comment is the agent's tag are
ever listed or cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hpc.config import AgentConfig
from hpc.jobs.squeue import (
    SQUEUE_FORMAT,
    START_FORMAT,
    ParseError,
    first_error_line,
    parse_sbatch_parsable,
    parse_squeue,
    parse_start_estimates,
    parse_test_only,
    service_of,
    tagged_jobs,
)
from hpc.jobs.system import JobInfo, JobTag, StartEstimate, Submission, private_dir

log = logging.getLogger(__name__)

# scancel/squeue of a job Slurm has already forgotten: nothing left to do.
_GONE = ("invalid job id", "already completing or completed")


class SlurmError(RuntimeError):
    """A Slurm command failed; str() is the command and Slurm's first error line."""


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    stdout: str
    stderr: str


class SlurmJobSystem:
    """`hpc.jobs.system.JobSystem` on a real Slurm cluster, for one agent tag."""

    def __init__(self, config: AgentConfig, tag: JobTag) -> None:
        self._config = config
        self._tag = tag
        self._env = slurm_environment(config)
        # Slurm opens a job's log file but does not create its folder; private, as the
        # job dirs in it hold keys.
        private_dir(config.state_dir)
        private_dir(config.state_dir / "jobs")

    def _tool(self, name: str) -> str:
        folder = self._config.slurm_bin_dir
        return str(folder / name) if folder is not None else name

    def _sbatch(self, submission: Submission, mode: str) -> list[str]:
        return [
            self._tool("sbatch"),
            mode,
            f"--job-name={submission.job_name}",
            f"--comment={submission.comment}",
            f"--output={submission.log_path}",
            f"--chdir={self._config.state_dir}",
        ]

    async def submit(self, submission: Submission) -> str:
        """`sbatch --parsable` with the script on stdin; name, comment and log path in argv."""
        argv = self._sbatch(submission, "--parsable")
        env = {**self._env, **submission.environment}
        result = await self._run(argv, stdin=submission.script, env=env)
        self._check("sbatch", result)
        try:
            job_id = parse_sbatch_parsable(result.stdout)
        except ParseError as error:
            raise SlurmError(f"sbatch: {error}") from None
        log.info("submitted job %s for service %s", job_id, submission.service)
        return job_id

    async def list_jobs(self) -> list[JobInfo]:
        """This agent's jobs that Slurm still shows (pending, running, completing...)."""
        argv = [
            self._tool("squeue"),
            "--noheader",
            f"--user={os.getuid()}",
            f"--format={SQUEUE_FORMAT}",
        ]
        result = await self._run(argv)
        self._check("squeue", result)
        try:
            return tagged_jobs(result.stdout, self._tag)
        except ParseError as error:
            raise SlurmError(f"squeue: {error}") from None

    async def test_start(self, submission: Submission) -> StartEstimate:
        """When Slurm would start this job now (`sbatch --test-only`: nothing is queued)."""
        argv = self._sbatch(submission, "--test-only")
        env = {**self._env, **submission.environment}
        result = await self._run(argv, stdin=submission.script, env=env)
        self._check("sbatch", result)
        try:
            return parse_test_only(result.stderr)
        except ParseError as error:
            raise SlurmError(f"sbatch: {error}") from None

    async def expected_starts(self, job_ids: Sequence[str]) -> dict[str, float | None]:
        """Slurm's expected start of each of these jobs still pending (`squeue --start`);
        None where the scheduler has not estimated one yet."""
        ids = [job_id for job_id in job_ids if job_id.isdigit()]
        if not ids:
            return {}
        argv = [
            self._tool("squeue"),
            "--start",
            "--noheader",
            f"--jobs={','.join(ids)}",
            f"--format={START_FORMAT}",
        ]
        result = await self._run(argv)
        if result.returncode != 0 and _gone(result.stderr):
            return {}
        self._check("squeue", result)
        try:
            return parse_start_estimates(result.stdout)
        except ParseError as error:
            raise SlurmError(f"squeue: {error}") from None

    async def cancel(self, job_id: str) -> None:
        """`scancel JOB`: Slurm sends SIGTERM to the job's processes, SIGKILL after KillWait.

        The job script traps SIGTERM and stops its server gracefully within that time.
        A job that is not this agent's raises SlurmError; one already gone is a no-op.
        """
        if not job_id.isdigit():
            raise SlurmError(f"scancel: {job_id!r} is not a Slurm job id")
        if not await self._is_ours(job_id):
            return
        result = await self._run([self._tool("scancel"), job_id])
        if result.returncode != 0 and not _gone(result.stderr):
            self._check("scancel", result)
        log.info("cancelled job %s", job_id)

    async def _is_ours(self, job_id: str) -> bool:
        argv = [self._tool("squeue"), "--noheader", f"--jobs={job_id}", f"--format={SQUEUE_FORMAT}"]
        result = await self._run(argv)
        if result.returncode != 0 and _gone(result.stderr):
            return False
        self._check("squeue", result)
        rows = [row for row in parse_squeue(result.stdout) if row.job_id == job_id]
        if not rows:
            return False
        if service_of(rows[0], self._tag) is None:
            raise SlurmError(f"scancel: job {job_id} is not one of this agent's jobs")
        return True

    async def aclose(self) -> None:
        """Nothing to release: every call owns its own subprocess."""

    async def _run(
        self, argv: list[str], stdin: str | None = None, env: dict[str, str] | None = None
    ) -> CommandResult:
        return await run_command(argv, self._config.slurm_timeout, env or self._env, stdin)

    @staticmethod
    def _check(tool: str, result: CommandResult) -> None:
        if result.returncode != 0:
            raise SlurmError(f"{tool}: {first_error_line(result.stderr)}")


def _gone(stderr: str) -> bool:
    lowered = stderr.lower()
    return any(marker in lowered for marker in _GONE)


def slurm_environment(config: AgentConfig) -> dict[str, str]:
    """The agent's environment plus what makes Slurm's output parseable and its config found."""
    env = dict(os.environ, TZ="UTC", SLURM_TIME_FORMAT="standard")
    if config.slurm_conf is not None:
        env["SLURM_CONF"] = str(config.slurm_conf)
    if config.slurm_bin_dir is not None:
        env["PATH"] = f"{config.slurm_bin_dir}{os.pathsep}{env.get('PATH', '')}"
    # A Slurm variable inherited from a surrounding job would redirect our calls.
    for key in ("SQUEUE_FORMAT", "SQUEUE_FORMAT2", "SBATCH_EXPORT", "SLURM_CLUSTERS"):
        env.pop(key, None)
    return env


async def run_command(
    argv: list[str], limit_s: float, env: dict[str, str], stdin: str | None = None
) -> CommandResult:
    """Run one command with a timeout; a timeout or a missing program is a SlurmError."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
    except OSError as error:
        raise SlurmError(f"{Path(argv[0]).name}: cannot run: {error.strerror or error}") from None
    try:
        async with asyncio.timeout(limit_s):
            out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
    except TimeoutError:
        raise SlurmError(f"{Path(argv[0]).name}: no answer within {limit_s:.0f}s") from None
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return CommandResult(
        proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")
    )
