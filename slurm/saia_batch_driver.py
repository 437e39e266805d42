"""The batch driver a batch job runs (slurm/batch.sh): a model server, then the input through it.

    python saia_batch_driver.py -i input.jsonl -o output.jsonl -e errors.jsonl \
        [--concurrency 64] [--request-timeout 600] [--grace 5] -- vllm serve MODEL ...

It starts the server argv after `--` with `--host 127.0.0.1 --port P` and a key of its own
in VLLM_API_KEY (never in argv), waits for `/health`, then sends the input's requests with
at most `--concurrency` in flight. Each answer is appended to the output file (status 200)
or the errors file (any other status) as one whole line of `vllm run-batch`'s shape,
`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`, the
moment it arrives: at any time the two files hold every finished request.

Resume: the custom_ids already in either file are not sent again; a torn last line (the
job was killed mid-write) is cut off, so that request is sent again. A request the server
did not answer (connection lost, server gone), or answered with a 5xx while stopping or
unhealthy, is written nowhere and is sent by the next run. SIGTERM (time limit, preemption,
scancel) stops new requests, lets those in flight finish within `--grace` seconds, and
exits 143.

Why asyncio with raw HTTP/1.1 (one short connection per request) and not http.client in
threads: a few dozen requests in flight are a few dozen coroutines; a stop is one event
that every worker sees, and cancelling what is left after the grace is reliable, where
threads blocked in a socket read could not be interrupted. The server is on 127.0.0.1 of
the same node, so a connection per request costs well under a millisecond.

Stdlib only, Python 3.10+: the job runs it with its own python, not saia's environment.
Exit status: 0 every request answered; 143 stopped by a signal; 3 the server did not
start or went away; 2 bad arguments or input file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

CHAT_URLS = ("/v1/chat/completions", "/v1/embeddings")  # and */score, */rerank: vLLM's set
PROGRESS_EVERY = 5.0  # seconds between progress lines (as `vllm run-batch`)
MAX_RESPONSE = 256 * 1024 * 1024
STOPPED, SERVER_FAILED, BAD_INPUT = 143, 3, 2


class ServerGone(Exception):
    """The server did not answer at all (the request stays unanswered)."""


def log(message: str) -> None:
    print(f"saia-batch: {message}", file=sys.stderr, flush=True)


def answered_ids(path: str) -> set[str]:
    """custom_ids of the whole lines of `path`; a torn last line is cut off the file."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return set()
    end = data.rfind(b"\n") + 1
    if end < len(data):  # killed mid-write: that request is sent again
        os.truncate(path, end)
    ids = set()
    for raw in data[:end].splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if isinstance(line, dict) and isinstance(line.get("custom_id"), str):
            ids.add(line["custom_id"])
    return ids


def input_lines(path: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield line


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def result_line(custom_id: Any, status: int, body: Any, error: Any) -> dict[str, Any]:
    response = {"status_code": status, "request_id": f"vllm-batch-{uuid.uuid4().hex}",
                "body": body if status == 200 else None}  # fmt: skip
    return {"id": f"vllm-{uuid.uuid4().hex}", "custom_id": custom_id,
            "response": response, "error": error}  # fmt: skip


def refusal(request: Any) -> dict[str, Any] | None:
    """The error line of a request the driver does not send (as `vllm run-batch` refuses)."""
    if not isinstance(request, dict) or not isinstance(request.get("body"), dict):
        return result_line(None, 400, None, "the line is not a batch request object")
    url, custom_id = request.get("url"), request.get("custom_id")
    if not isinstance(url, str) or not (
        url in CHAT_URLS or (url.startswith("/") and url.endswith(("/score", "/rerank")))
    ):
        message = f"URL {str(url)[:200]} is not supported. Supported endpoints: "
        return result_line(custom_id, 400, None, message + "/v1/chat/completions, "
                           "/v1/embeddings, /score, /rerank, /v1/score, /v1/rerank")  # fmt: skip
    if request["body"].get("stream"):
        return result_line(custom_id, 400, None, "Request must not be sent in stream mode")
    return None


def parse_response(data: bytes) -> tuple[int, bytes]:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        raise ServerGone("the server closed the connection mid-answer")
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split(" ", 2)[1])
    except (IndexError, ValueError):
        raise ServerGone(f"not an HTTP answer: {lines[0][:100]!r}") from None
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = dechunk(body)
    elif "content-length" in headers:
        length = int(headers["content-length"])
        if len(body) < length:
            raise ServerGone("the server closed the connection mid-answer")
        body = body[:length]
    return status, body


def dechunk(data: bytes) -> bytes:
    out, position = bytearray(), 0
    while True:
        end = data.index(b"\r\n", position)
        size = int(data[position:end].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += data[end + 2 : end + 2 + size]
        position = end + 4 + size


async def http(port: int, key: str, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    """One request on a connection of its own (closed by the server after the answer)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as error:
        raise ServerGone(str(error)) from None
    try:
        head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")  # fmt: skip
        writer.write(head.encode() + body)
        await writer.drain()
        data = bytearray()
        while chunk := await reader.read(65536):  # until the server closes
            data += chunk
            if len(data) > MAX_RESPONSE:
                raise ServerGone(f"an answer over {MAX_RESPONSE} bytes")
    except (OSError, asyncio.IncompleteReadError) as error:
        raise ServerGone(str(error)) from None
    finally:
        writer.close()
    return parse_response(bytes(data))


class Driver:
    def __init__(self, args: argparse.Namespace, port: int, key: str) -> None:
        self.args, self.port, self.key = args, port, key
        self.stopping = asyncio.Event()
        self.signalled = False
        self.server_failed: str | None = None
        self.total = self.done = 0
        self._pending: Iterator[Any] = iter(())  # request objects not answered yet
        self._files = {
            True: os.open(args.output_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600),
            False: os.open(args.error_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600),
        }

    def stop(self) -> None:
        self.signalled = True
        self.stopping.set()

    def close(self) -> None:
        for fd in self._files.values():
            os.fsync(fd)
            os.close(fd)

    def write(self, line: dict[str, Any]) -> None:
        """One whole line with O_APPEND writes: in the kernel when this returns."""
        ok = line["response"] is not None and line["response"]["status_code"] == 200
        view = memoryview(json.dumps(line, separators=(",", ":")).encode() + b"\n")
        while view:
            view = view[os.write(self._files[ok], view) :]
        self.done += 1

    def plan(self) -> int:
        """Skip what the files already answer; returns how many requests are left."""
        answered = answered_ids(self.args.output_file) | answered_ids(self.args.error_file)

        def pending() -> Iterator[Any]:
            for raw in input_lines(self.args.input_file):
                try:
                    request = json.loads(raw)
                except ValueError:
                    request = None
                custom_id = request.get("custom_id") if isinstance(request, dict) else None
                if custom_id not in answered:
                    yield request

        self.total = sum(1 for _ in input_lines(self.args.input_file))
        left = sum(1 for _ in pending())
        self.done, self._pending = self.total - left, pending()
        return left

    async def worker(self) -> None:
        for request in self._pending:  # shared: each request goes to one worker
            if self.stopping.is_set():
                return
            try:
                line = await self.one(request)
                if line["response"]["status_code"] >= 500 and not await self.healthy():
                    raise ServerGone(f"status {line['response']['status_code']}, not healthy")
            except ServerGone as error:
                self.server_failed = self.server_failed or str(error)
                self.stopping.set()
                return
            self.write(line)

    async def healthy(self) -> bool:
        """Whether a server error is the request's own: a server that is shutting down (its
        engine stopped by the same SIGTERM) fails what it holds, which the next job sends."""
        if self.stopping.is_set():
            return False
        try:
            status, _ = await asyncio.wait_for(http(self.port, self.key, "GET", "/health"), 10)
        except (ServerGone, asyncio.TimeoutError):  # noqa: UP041 (not TimeoutError before 3.11)
            return False
        return status == 200

    async def one(self, request: Any) -> dict[str, Any]:
        refused = refusal(request)
        if refused is not None:
            return refused
        custom_id, body = request.get("custom_id"), json.dumps(request["body"]).encode()
        try:
            status, data = await asyncio.wait_for(
                http(self.port, self.key, "POST", request["url"], body), self.args.request_timeout
            )
        except asyncio.TimeoutError:  # noqa: UP041 (not TimeoutError before 3.11)
            message = f"no answer within {self.args.request_timeout:g} s"
            error = {"message": message, "type": "timeout", "param": None, "code": 504}
            return result_line(custom_id, 504, None, error)
        try:
            answer = json.loads(data)
        except ValueError:
            answer = {"message": data[:500].decode("utf-8", "replace")}
        return result_line(custom_id, status, answer, None if status == 200 else answer)

    async def progress(self) -> None:
        while True:
            percent = round(100 * self.done / self.total) if self.total else 100
            log_line = f"Running batch: {percent:3d}% Completed | {self.done}/{self.total}"
            print(log_line, file=sys.stderr, flush=True)
            await asyncio.sleep(PROGRESS_EVERY)

    async def run(self) -> None:
        workers = [asyncio.create_task(self.worker()) for _ in range(self.args.concurrency)]
        ticker = asyncio.create_task(self.progress())
        everything: asyncio.Future[Any] = asyncio.gather(*workers)
        stop: asyncio.Future[Any] = asyncio.create_task(self.stopping.wait())
        await asyncio.wait([everything, stop], return_when=asyncio.FIRST_COMPLETED)
        if not everything.done():  # stopped: those in flight get the grace, then are cut
            await asyncio.wait([everything], timeout=self.args.grace)
        for task in [*workers, ticker, stop]:
            task.cancel()
        await asyncio.gather(*workers, ticker, stop, return_exceptions=True)


async def wait_ready(driver: Driver, server: asyncio.subprocess.Process) -> bool:
    deadline = time.monotonic() + driver.args.ready_timeout
    while time.monotonic() < deadline and not driver.stopping.is_set():
        if server.returncode is not None:
            driver.server_failed = f"the server exited with status {server.returncode}"
            return False
        try:
            status, _ = await asyncio.wait_for(http(driver.port, driver.key, "GET", "/health"), 10)
            if status == 200:
                return True
        except (ServerGone, asyncio.TimeoutError):  # noqa: UP041
            pass
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(driver.stopping.wait(), 1.0)
    if not driver.stopping.is_set():
        driver.server_failed = f"the server was not ready within {driver.args.ready_timeout} s"
    return False


async def stop_server(server: asyncio.subprocess.Process) -> None:
    if server.returncode is None:
        server.terminate()
        try:
            await asyncio.wait_for(server.wait(), 20)
        except asyncio.TimeoutError:  # noqa: UP041 (not TimeoutError before 3.11)
            server.kill()
            await server.wait()


async def main_async(args: argparse.Namespace) -> int:
    key, port = secrets.token_hex(24), free_port()
    driver = Driver(args, port, key)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, driver.stop)
    left = driver.plan()
    log(f"{driver.total} requests, {left} left to send")
    if left == 0:
        driver.close()
        return 0
    argv = [*args.server, "--host", "127.0.0.1", "--port", str(port)]
    server = await asyncio.create_subprocess_exec(*argv, env={**os.environ, "VLLM_API_KEY": key})
    try:
        if await wait_ready(driver, server):
            log(f"the server answers on port {port}; sending with {args.concurrency} in flight")
            await driver.run()
    finally:
        driver.close()
        await stop_server(server)
    if driver.done >= driver.total:
        return 0
    if driver.server_failed and not driver.signalled:
        log(f"stopped: {driver.server_failed}; {driver.total - driver.done} requests left")
        return SERVER_FAILED
    log(f"stopped by a signal; {driver.total - driver.done} requests left")
    return STOPPED


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="saia_batch_driver.py")
    parser.add_argument("-i", "--input-file", required=True)
    parser.add_argument("-o", "--output-file", required=True)
    parser.add_argument("-e", "--error-file", required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--request-timeout", type=float, default=600.0)
    parser.add_argument("--grace", type=float, default=5.0)
    parser.add_argument("--ready-timeout", type=float, default=3600.0)
    parser.add_argument("server", nargs="+", help="the server's argv (after --)")
    args = parser.parse_args(argv)
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    if not os.path.isfile(args.input_file):
        log(f"no input file {args.input_file}")
        return BAD_INPUT
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
