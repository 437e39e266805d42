"""Fast tests at the job-system seam (`tests/hpc/fakes.py` MemoryJobSystem; the real Slurm
path is tests/faults/test_batches.py): the agent's batch requests, and what each bad one
gets — one OpenAI error, nothing submitted."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from hpc.batch.manager import BatchManager
from hpc.config import parse_config
from saia.base import protocol as wire
from tests.hpc.batch.test_vllm_batch import Collected
from tests.hpc.fakes import MemoryJobSystem

BATCH = "batch-0123456789abcdef01234567"


def manager(tmp_path: Path) -> tuple[BatchManager, MemoryJobSystem]:
    config = parse_config({"state_dir": str(tmp_path), "services": [
        {"name": "bulk", "model": "m", "template": "standin"}]})  # fmt: skip
    jobs = MemoryJobSystem(time.time)
    return BatchManager(lambda: config, lambda _config, _tag: jobs), jobs


async def ask(
    batches: BatchManager,
    method: str,
    path: str,
    body: bytes = b"",
    offset: str | None = None,
    raw: bool = False,
) -> tuple[int, Any]:
    sink = Collected()
    headers = [("x-saia-offset", offset)] if offset is not None else []
    await batches.answer(sink, wire.RequestHead("", method, f"/saia/batches/{path}", headers), body)
    assert sink.finished
    return sink.status, bytes(sink.body) if raw else json.loads(sink.body)


SPEC = json.dumps({"service": "bulk", "requests": 2, "window_s": 3600}).encode()


async def test_a_batch_from_input_to_output(tmp_path: Path) -> None:
    batches, jobs = manager(tmp_path)
    assert await ask(batches, "PUT", f"{BATCH}/input", b"line one\n", "0") == (200, {"size": 9})
    assert await ask(batches, "PUT", f"{BATCH}/input", b"line two\n", "9") == (200, {"size": 18})
    status, answer = await ask(batches, "POST", BATCH, SPEC)
    assert status == 200 and answer["state"] == "queued" and jobs.submissions
    assert jobs.submissions[0].job_name == f"saia-{BATCH}"
    assert (await ask(batches, "POST", BATCH, SPEC))[1]["job_id"] == answer["job_id"]  # again
    assert len(jobs.submissions) == 1
    folder = tmp_path / "batches" / BATCH
    assert (folder / "input.jsonl").read_bytes() == b"line one\nline two\n"
    assert (await ask(batches, "GET", BATCH))[1]["state"] == "queued"
    jobs.end(answer["job_id"])
    assert (await ask(batches, "GET", BATCH))[1]["state"] == "queued"  # one squeue a second
    (folder / "output.jsonl").write_text('{"custom_id": "a"}\n{"custom_id": "b"}\n')
    (folder / "exit_code").write_text("0\n")  # as slurm/batch.sh writes it at the end
    assert (await ask(batches, "GET", BATCH))[1]["state"] == "completed"
    output = (200, b'{"custom_id": "a"}\n{"custom_id": "b"}\n')
    assert await ask(batches, "GET", f"{BATCH}/output", raw=True) == output
    assert await ask(batches, "DELETE", BATCH) == (200, {"deleted": True})
    assert not folder.exists()


async def test_bad_requests_are_refused_and_nothing_is_submitted(tmp_path: Path) -> None:
    batches, jobs = manager(tmp_path)
    other = json.dumps({"service": "nope", "requests": 1, "window_s": 60}).encode()
    cases = [
        (("GET", "../../etc"), 400, "bad_batch_id"),
        (("PUT", f"{BATCH}/input", b"x", None), 400, "bad_offset"),
        (("PUT", f"{BATCH}/input", b"x", "5"), 409, "bad_offset"),
        (("POST", BATCH, SPEC), 409, "no_input"),
        (("POST", BATCH, b"{not json"), 400, "bad_spec"),
        (("GET", BATCH), 404, "batch_not_found"),
        (("GET", f"{BATCH}/output"), 404, "no_output"),
        (("PATCH", BATCH), 404, "unknown_endpoint"),
    ]
    for request, status, code in cases:
        answer = await ask(batches, *request)  # type: ignore[arg-type]
        assert answer[0] == status and answer[1]["error"]["code"] == code, (request, answer)
    await ask(batches, "PUT", f"{BATCH}/input", b"x\n", "0")
    assert (await ask(batches, "POST", BATCH, other))[1]["error"]["code"] == "model_not_found"
    jobs.fail_submit = RuntimeError("sbatch: error: Batch job submission failed")
    status, answer = await ask(batches, "POST", BATCH, SPEC)
    assert status == 503 and "sbatch: error" in answer["error"]["message"]
    assert jobs.submissions == []


def answers(*ids: str) -> str:
    return "".join(
        json.dumps({"custom_id": i, "response": {"status_code": 200, "body": {}}, "error": None})
        + "\n"
        for i in ids
    )


async def test_a_stopped_job_is_followed_by_another_until_the_attempts_run_out(
    tmp_path: Path,
) -> None:
    batches, jobs = manager(tmp_path)  # batch.max_attempts: 4 by default
    folder = tmp_path / "batches" / BATCH
    await ask(batches, "PUT", f"{BATCH}/input", b"a\nb\nc\n", "0")
    spec = json.dumps({"service": "bulk", "requests": 3, "window_s": 86400}).encode()
    job = (await ask(batches, "POST", BATCH, spec))[1]["job_id"]
    (folder / "output.jsonl").write_text(answers("a") + '{"custom_id": "b", "resp')  # torn
    (folder / "errors.jsonl").write_text(answers("x"))
    jobs.end(job)  # Slurm ended it at its time limit: the script wrote 143
    (folder / "exit_code").write_text("143\n")
    batches._list = None
    state = (await ask(batches, "GET", BATCH))[1]
    assert (state["state"], state["completed"], state["failed"]) == ("queued", 1, 1)
    assert state["job_id"] != job and list(jobs.jobs) == [state["job_id"]]
    assert (folder / f"exit_code.{job}").read_text() == "143\n"  # the next job writes anew
    assert not (folder / "exit_code").exists()
    assert "resubmitted for 1 requests left" in state["message"]
    assert "--time=" in jobs.submissions[1].script  # planned for what is left
    for _attempt in range(3):  # jobs 2, 3 and 4 end with no result at all (node failure)
        jobs.end(state["job_id"])
        batches._list = None
        state = (await ask(batches, "GET", BATCH))[1]
    assert state["state"] == "failed" and "4 jobs ran" in state["message"]
    assert len(jobs.submissions) == 4
    output = await ask(batches, "GET", f"{BATCH}/output", raw=True)
    assert output == (200, (answers("a") + answers("x")).encode())  # whole lines of both


async def test_a_cancelled_batch_is_not_resubmitted(tmp_path: Path) -> None:
    batches, jobs = manager(tmp_path)
    await ask(batches, "PUT", f"{BATCH}/input", b"a\nb\n", "0")
    job = (await ask(batches, "POST", BATCH, SPEC))[1]["job_id"]
    assert (await ask(batches, "POST", f"{BATCH}/cancel"))[1]["state"] == "cancelled"
    assert jobs.cancelled == [job] and len(jobs.submissions) == 1
