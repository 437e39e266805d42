"""The batch job's driver (slurm/saia_batch_driver.py) as the job runs it, over a real
stand-in server it starts itself: output as it goes, resume after SIGKILL, SIGTERM's grace,
bounded concurrency, and error answers in the errors file."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx

from tests.hpc.helpers import until

DRIVER = Path(__file__).resolve().parents[3] / "slurm" / "saia_batch_driver.py"
LIMIT = 60.0  # generous: the machine is shared


def request(i: int, model: str = "m", words: int = 3, max_tokens: int = 4) -> dict[str, Any]:
    text = " ".join(f"w{i}-{j}" for j in range(words))
    body = {"model": model, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": text}]}  # fmt: skip
    return {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}


def write_input(folder: Path, lines: list[dict[str, Any]]) -> None:
    (folder / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def results(path: Path) -> list[dict[str, Any]]:
    """Every line of a result file, each of which must be whole JSON."""
    if not path.exists():
        return []
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), data[-200:]
    return [json.loads(line) for line in data.splitlines()]


class Run:
    def __init__(self, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.proc, self.log = proc, log

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def port(self) -> int | None:
        found = re.search(r"the server answers on port (\d+)", self.text())
        return int(found.group(1)) if found else None


STANDIN = [sys.executable, "-m", "hpc.standin", "--model-name", "m", "--api-key-env",
           "VLLM_API_KEY"]  # fmt: skip


@asynccontextmanager
async def driver(
    folder: Path,
    concurrency: int = 4,
    token_delay: float = 0.01,
    grace: float = 5.0,
    options: tuple[str, ...] = (),
    server: tuple[str, ...] = (),
) -> AsyncIterator[Run]:
    """The driver over folder/in.jsonl with its own stand-in (or `server`); killed with its
    server (its process group) at the end if still running."""
    log = folder / f"driver-{time.monotonic_ns()}.log"
    argv = [
        sys.executable, str(DRIVER), "-i", str(folder / "in.jsonl"),
        "-o", str(folder / "out.jsonl"), "-e", str(folder / "err.jsonl"),
        "--concurrency", str(concurrency), "--grace", str(grace), *options, "--",
        *(server or [*STANDIN, "--token-delay", str(token_delay)]),
    ]  # fmt: skip
    with log.open("wb") as sink:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=sink, stderr=sink, start_new_session=True
        )
    try:
        yield Run(proc, log)
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()


async def finished(run: Run) -> int:
    async with asyncio.timeout(LIMIT):
        return await run.proc.wait()


async def test_killed_mid_way_it_resumes_and_answers_each_request_once(tmp_path: Path) -> None:
    write_input(tmp_path, [request(i, words=8, max_tokens=8) for i in range(60)])
    out = tmp_path / "out.jsonl"
    async with driver(tmp_path, token_delay=0.02) as run:
        await until(lambda: len(results(out)) >= 10, LIMIT, "10 answers written")
        os.killpg(run.proc.pid, signal.SIGKILL)  # the job is killed: no chance to flush
        await run.proc.wait()
    first = results(out)  # every line written is whole and valid
    assert 10 <= len(first) < 60
    for line in first:
        assert line["response"]["status_code"] == 200 and line["error"] is None
        assert line["response"]["body"]["choices"][0]["message"]["content"].startswith("echo:")
    with out.open("ab") as handle:  # as if killed half-way through writing a line
        handle.write(b'{"id":"vllm-torn","custom_id":"r59","response":{"status_co')
    async with driver(tmp_path) as run:
        assert await finished(run) == 0, run.text()
        assert f"60 requests, {60 - len(first)} left to send" in run.text()
    final = results(out)
    ids = [line["custom_id"] for line in final]
    assert sorted(ids) == sorted(f"r{i}" for i in range(60))  # each exactly once
    assert final[: len(first)] == first  # what the first run wrote is kept as it was
    assert not results(tmp_path / "err.jsonl")


async def test_sigterm_lets_the_requests_in_flight_finish_and_sends_no_more(
    tmp_path: Path,
) -> None:
    write_input(tmp_path, [request(i, words=10, max_tokens=12) for i in range(40)])
    out = tmp_path / "out.jsonl"
    async with driver(tmp_path, concurrency=4, token_delay=0.1) as run:  # ~1.2 s a request
        await until(lambda: len(results(out)) >= 4, LIMIT, "4 answers written")
        at_signal = len(results(out))
        run.proc.send_signal(signal.SIGTERM)
        assert await finished(run) == 143, run.text()
        assert "stopped by a signal" in run.text()
    kept = results(out)
    assert at_signal < len(kept) <= at_signal + 4, (at_signal, len(kept))  # those in flight
    assert len({line["custom_id"] for line in kept}) == len(kept) < 40


async def test_no_more_than_the_concurrency_is_in_flight(tmp_path: Path) -> None:
    write_input(tmp_path, [request(i, words=6, max_tokens=6) for i in range(30)])
    running: list[float] = []
    async with driver(tmp_path, concurrency=3, token_delay=0.05) as run:
        port = await until(run.port, LIMIT, "the server ready")
        async with httpx.AsyncClient(timeout=5) as client:
            while run.proc.returncode is None:
                try:
                    metrics = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
                except httpx.TransportError:
                    break  # the driver is done and has stopped its server
                found = re.search(r"^vllm:num_requests_running\S* (\S+)$", metrics, re.M)
                running.append(float(found.group(1)) if found else 0.0)
                try:
                    async with asyncio.timeout(0.05):
                        await run.proc.wait()
                except TimeoutError:
                    pass
        assert await finished(run) == 0, run.text()
    assert max(running) == 3, running  # kept full, never more
    assert len(results(tmp_path / "out.jsonl")) == 30


async def test_error_answers_go_to_the_errors_file(tmp_path: Path) -> None:
    streamed = request(2)
    streamed["body"]["stream"] = True
    odd_url = request(3) | {"url": "/v1/images/generations"}
    write_input(tmp_path, [request(0), request(1, model="nope"), streamed, odd_url, request(4)])
    async with driver(tmp_path) as run:
        assert await finished(run) == 0, run.text()
    good = results(tmp_path / "out.jsonl")
    assert sorted(line["custom_id"] for line in good) == ["r0", "r4"]
    errors = {line["custom_id"]: line for line in results(tmp_path / "err.jsonl")}
    assert sorted(errors) == ["r1", "r2", "r3"]
    for line in errors.values():  # vLLM run-batch's shape
        assert set(line) == {"id", "custom_id", "response", "error"} and line["error"]
        assert line["response"]["body"] is None and line["response"]["request_id"]
    assert errors["r1"]["response"]["status_code"] == 404
    assert "does not exist" in errors["r1"]["error"]["error"]["message"]
    assert errors["r2"]["response"]["status_code"] == 400
    assert "stream" in errors["r2"]["error"] and "not supported" in errors["r3"]["error"]
    async with driver(tmp_path) as run:  # all answered: nothing is sent again
        assert await finished(run) == 0 and "5 requests, 0 left to send" in run.text()


async def test_a_request_past_its_timeout_is_an_error_line(tmp_path: Path) -> None:
    write_input(tmp_path, [request(0, words=1, max_tokens=2), request(1, words=30, max_tokens=30)])
    async with driver(tmp_path, token_delay=0.2, options=("--request-timeout", "2")) as run:
        assert await finished(run) == 0, run.text()  # r0 takes 0.4 s, r1 6 s
    assert [line["custom_id"] for line in results(tmp_path / "out.jsonl")] == ["r0"]
    [late] = results(tmp_path / "err.jsonl")
    assert late["custom_id"] == "r1" and late["response"]["status_code"] == 504
    assert late["error"]["message"] == "no answer within 2 s"


async def test_a_server_that_does_not_start_leaves_every_request_for_the_next_job(
    tmp_path: Path,
) -> None:
    write_input(tmp_path, [request(i) for i in range(3)])
    broken = (sys.executable, "-c", "import sys; sys.exit(7)")
    async with driver(tmp_path, server=broken) as run:
        assert await finished(run) == 3, run.text()
        assert "the server exited with status 7" in run.text()
    assert results(tmp_path / "out.jsonl") == results(tmp_path / "err.jsonl") == []
