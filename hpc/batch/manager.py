"""The agent's batch manager: the hop's reserved paths /saia/batches/<id>[/input|/cancel|/output].

The router hands these requests here instead of to a backend. A batch lives in
`<state_dir>/batches/<id>/` (0700): `input.jsonl` (written piece by piece at the offsets
the hub sends), `batch.json` (the spec, the job id, the deadline and the jobs so far,
written atomically), `exit_code` (written by the job script) and `output.jsonl` and
`errors.jsonl` (appended by the job's driver as answers arrive). Everything the manager
knows is in those files and in Slurm, so an agent restarted mid-batch carries on with the
same job (its jobs carry the batch tag, `<prefix>-<batch id>` and comment
`saia-agent:<batch tag>`, which the scheduler's own tag never matches). A job that ended
with requests left is followed by another (`hpc.batch.plan.batch_state` decides), whose
driver skips what the files already answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from hpc.batch.plan import BATCH_ID, Observed, batch_state, plan_job
from hpc.batch.script import render_batch
from hpc.config import AgentConfig
from hpc.jobs.script import JobScriptError
from hpc.jobs.system import JobSystem, JobTag, private_dir, stable_token, write_atomic
from saia.base import protocol as wire

log = logging.getLogger(__name__)

PREFIX = "/saia/batches/"
CHUNK = 256 * 1024
RESULTS = ("output.jsonl", "errors.jsonl")  # answers, error answers: the driver's files
JSON = [("content-type", "application/json")]
LIST_TTL = 1.0  # seconds one squeue answers every status question


class Sink(Protocol):
    """Where an answer goes (`hpc.router.session.StreamSink`)."""

    def start(self, status: int, headers: list[tuple[str, str]]) -> None: ...

    async def send(self, data: bytes) -> None: ...

    def finish(self) -> None: ...


class BatchError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


def make_jobs(config: AgentConfig, tag: JobTag) -> JobSystem:
    if config.executor == "local":
        from hpc.jobs.local import LocalJobSystem

        return LocalJobSystem(config, tag)
    from hpc.jobs.slurm import SlurmJobSystem

    return SlurmJobSystem(config, tag)


def batch_tag(state_dir: Path) -> str:
    """This state dir's batch job tag, made once (stable across agent restarts)."""
    return stable_token(private_dir(state_dir / "batches") / "tag", prefix="b")


async def reply(sink: Sink, status: int, data: dict[str, Any]) -> None:
    sink.start(status, JSON)
    await sink.send(json.dumps(data).encode())
    sink.finish()


class BatchManager:
    def __init__(
        self,
        config: Callable[[], AgentConfig],
        jobs: Callable[[AgentConfig, JobTag], JobSystem] = make_jobs,
    ) -> None:
        self._config = config
        self._make_jobs = jobs
        self._jobs: JobSystem | None = None
        self._list: tuple[float, dict[str, Any]] | None = None  # (when, job id -> JobInfo)
        self._lock = asyncio.Lock()  # one status, resubmission or cancel at a time
        self._counts: dict[Path, tuple[int, int]] = {}  # file -> (bytes counted, lines)

    @property
    def config(self) -> AgentConfig:
        return self._config()

    def jobs(self) -> JobSystem:
        if self._jobs is None:
            config = self.config
            self._jobs = self._make_jobs(
                config, JobTag(config.job_prefix, batch_tag(config.state_dir))
            )
        return self._jobs

    def folder(self, batch_id: str) -> Path:
        return self.config.state_dir / "batches" / batch_id

    async def answer(self, sink: Sink, head: wire.RequestHead, body: bytes) -> None:
        try:
            await self._route(sink, head, body)
        except BatchError as error:
            kind = "invalid_request_error" if error.status < 500 else "server_error"
            message = {"message": str(error), "type": kind, "param": None, "code": error.code}
            await reply(sink, error.status, {"error": message})

    async def _route(self, sink: Sink, head: wire.RequestHead, body: bytes) -> None:
        batch_id, _, action = head.path[len(PREFIX) :].partition("/")
        if not BATCH_ID.match(batch_id):
            raise BatchError(400, "bad_batch_id", f"{batch_id[:80]!r} is not a batch id")
        route = (head.method, action)
        if route == ("PUT", "input"):
            headers = dict(head.headers)
            await reply(sink, 200, self.put_input(batch_id, headers.get("x-saia-offset"), body))
        elif route == ("POST", ""):
            await reply(sink, 200, await self.submit(batch_id, body))
        elif route == ("GET", ""):
            await reply(sink, 200, await self.status(batch_id))
        elif route == ("POST", "cancel"):
            await reply(sink, 200, await self.cancel(batch_id))
        elif route == ("GET", "output"):
            await self.output(sink, batch_id)
        elif route == ("DELETE", ""):
            await reply(sink, 200, await self.forget(batch_id))
        else:
            raise BatchError(
                404, "unknown_endpoint", f"{head.method} {head.path[:200]} is not served"
            )

    def put_input(self, batch_id: str, offset_text: str | None, data: bytes) -> dict[str, Any]:
        """Write one piece of the input at its offset (0 starts the file anew)."""
        folder = self.folder(batch_id)
        if (folder / "batch.json").exists():
            raise BatchError(409, "batch_submitted", f"batch {batch_id} is already submitted")
        if offset_text is None or not offset_text.isdigit():
            raise BatchError(400, "bad_offset", "x-saia-offset must be a byte offset")
        offset, path = int(offset_text), private_dir(folder) / "input.jsonl"
        size = path.stat().st_size if path.exists() else 0
        if offset not in (0, size):
            raise BatchError(409, "bad_offset", f"the input holds {size} bytes, not {offset}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if offset == 0 else 0), 0o600)
        try:
            os.lseek(fd, offset, os.SEEK_SET)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view[:CHUNK]) :]
        finally:
            os.close(fd)
        return {"size": offset + len(data)}

    def _spec(self, batch_id: str) -> dict[str, Any] | None:
        try:
            data = json.loads((self.folder(batch_id) / "batch.json").read_text())
        except (FileNotFoundError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    async def submit(self, batch_id: str, body: bytes) -> dict[str, Any]:
        existing = self._spec(batch_id)
        if existing is not None:  # the hub asked again (a lost answer): same job
            return await self.status(batch_id)
        try:
            spec = json.loads(body)
            requests, window = int(spec["requests"]), float(spec["window_s"])
        except (ValueError, KeyError, TypeError):
            raise BatchError(400, "bad_spec", "the batch spec is not valid JSON") from None
        config, folder = self.config, self.folder(batch_id)
        service = config.service(str(spec.get("service", "")))
        if service is None:
            raise BatchError(
                404, "model_not_found", f"model {str(spec.get('service'))[:200]!r} is not served"
            )
        if not (folder / "input.jsonl").exists():
            raise BatchError(409, "no_input", f"batch {batch_id} has no input")
        record = {**spec, "service": service.name, "deadline": time.time() + window}
        async with self._lock:
            job_id = await self._start_job(batch_id, record, requests, attempts=1)
        return {"job_id": job_id, "state": "queued", "completed": 0, "failed": 0,
                "total": requests}  # fmt: skip

    async def _start_job(
        self, batch_id: str, record: dict[str, Any], requests: int, attempts: int
    ) -> str:
        """Submit a job for `requests` requests before the record's deadline; record it."""
        config, folder, now = self.config, self.folder(batch_id), time.time()
        service = config.service(str(record["service"]))
        if service is None:
            raise BatchError(404, "model_not_found", f"model {record['service']!r} is not served")
        user, group = record.get("user"), record.get("group")
        window = float(record["deadline"]) - now
        plan = plan_job(requests, window, user, group, service, config.batch, now)
        try:
            submission = render_batch(batch_id, service, config, self.jobs_tag(), plan, folder)
        except JobScriptError as error:
            raise BatchError(400, "bad_service", str(error)) from None
        job_id = await self._submit(submission)
        self._list = None  # the next status sees the new job
        record = {
            **record, "job_id": job_id, "submitted_at": now, "attempts": attempts,
            "time_limit_s": plan.time_limit_s, "account": plan.account, "qos": plan.qos,
        }  # fmt: skip
        write_atomic(folder / "batch.json", json.dumps(record))
        log.info("batch %s: job %s (attempt %d, %d requests, --time %d s)",
                 batch_id, job_id, attempts, requests, plan.time_limit_s)  # fmt: skip
        return job_id

    def jobs_tag(self) -> JobTag:
        return JobTag(self.config.job_prefix, batch_tag(self.config.state_dir))

    async def _submit(self, submission: Any) -> str:
        try:
            return await self.jobs().submit(submission)
        except Exception as error:  # SlurmError and the local executor's errors
            log.warning("batch job not submitted: %s", error)
            raise BatchError(
                503, "submit_failed", f"the batch job was not submitted: {error}"
            ) from None

    async def status(self, batch_id: str) -> dict[str, Any]:
        async with self._lock:
            return await self._status(batch_id)

    async def _status(self, batch_id: str) -> dict[str, Any]:
        spec = self._spec(batch_id)
        if spec is None:
            raise BatchError(404, "batch_not_found", f"no batch {batch_id} here")
        folder, job_id = self.folder(batch_id), str(spec["job_id"])
        job = (await self._listed()).get(job_id)
        completed, failed = (self._count(folder / name) for name in RESULTS)
        total = int(spec.get("requests") or 0)
        deadline = spec.get("deadline", spec.get("submitted_at", 0) + spec.get("window_s", 0))
        seen = Observed(
            job.state if job else None, _exit_code(folder), (folder / "cancel").exists(),
            completed + failed, total, int(spec.get("attempts", 1)), float(deadline),
        )  # fmt: skip
        state = batch_state(seen, self.config.batch, time.time())
        if state.resubmit:
            ended = folder / "exit_code"
            if ended.exists():  # the next job writes its own
                ended.replace(folder / f"exit_code.{job_id}")
            left = total - completed - failed
            job_id = await self._start_job(batch_id, spec, left, int(spec.get("attempts", 1)) + 1)
        return {"state": state.state, "message": state.message, "job_id": job_id,
                "completed": completed, "failed": failed, "total": total}  # fmt: skip

    def _count(self, path: Path) -> int:
        """Whole lines in `path`, reading only what was added since the last count (up to
        the last newline, so a torn line the driver cuts off is never counted)."""
        offset, lines = self._counts.get(path, (0, 0))
        try:
            handle = path.open("rb")
        except FileNotFoundError:
            return 0
        with handle:
            handle.seek(offset)
            position = offset
            while chunk := handle.read(CHUNK):
                lines += chunk.count(b"\n")
                if (end := chunk.rfind(b"\n")) >= 0:
                    offset = position + end + 1
                position += len(chunk)
        self._counts[path] = (offset, lines)
        return lines

    async def _listed(self) -> dict[str, Any]:
        """Slurm's list of our batch jobs, one squeue per LIST_TTL however many batches the
        hub asks about (the hub polls each batch in turn)."""
        now = time.monotonic()
        if self._list is not None and now - self._list[0] < LIST_TTL:
            return self._list[1]
        try:
            listed = {job.job_id: job for job in await self.jobs().list_jobs()}
        except Exception as error:
            raise BatchError(503, "slurm_unavailable", f"Slurm did not answer: {error}") from None
        self._list = (now, listed)
        return listed

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        async with self._lock:  # not while a resubmission is under way
            return await self._cancel(batch_id)

    async def _cancel(self, batch_id: str) -> dict[str, Any]:
        spec = self._spec(batch_id)
        if spec is None:
            raise BatchError(404, "batch_not_found", f"no batch {batch_id} here")
        write_atomic(self.folder(batch_id) / "cancel", "1\n")
        self._list = None
        try:
            await self.jobs().cancel(str(spec["job_id"]))
        except Exception as error:
            raise BatchError(503, "cancel_failed", f"scancel failed: {error}") from None
        return await self._status(batch_id)

    async def output(self, sink: Sink, batch_id: str) -> None:
        """The answers, then the error answers: whole lines only (a torn last line of a
        killed job would run into the next file's first)."""
        folder = self.folder(batch_id)
        paths = [folder / name for name in RESULTS if (folder / name).exists()]
        if not paths:
            raise BatchError(404, "no_output", f"batch {batch_id} has no output")
        sink.start(200, [("content-type", "application/jsonl")])
        for path in paths:
            with path.open("rb") as handle:
                carry = b""
                while chunk := handle.read(CHUNK):
                    data = carry + chunk
                    end = data.rfind(b"\n") + 1
                    whole, carry = data[:end], data[end:]
                    if whole:
                        await sink.send(whole)
        sink.finish()

    async def forget(self, batch_id: str) -> dict[str, Any]:
        """Remove the batch's files once its job ended (the hub has taken the output)."""
        if self._spec(batch_id) is not None:
            state = await self.status(batch_id)
            if state["state"] in ("queued", "running"):
                raise BatchError(409, "batch_running", f"batch {batch_id} is still running")
        shutil.rmtree(self.folder(batch_id), ignore_errors=True)
        for name in RESULTS:
            self._counts.pop(self.folder(batch_id) / name, None)
        return {"deleted": True}


def _exit_code(folder: Path) -> int | None:
    try:
        return int((folder / "exit_code").read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
