"""`saia demo` end to end: the README's first command, then the official openai client
through the real chain (hub -> sshd -> relay -> agent -> Slurm job), then Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from saia.sandbox.process import free_port, stop_process

pytestmark = [pytest.mark.e2e, pytest.mark.slurm, pytest.mark.ssh]
START_TIMEOUT = 240.0


@dataclass
class RunningDemo:
    process: subprocess.Popen[bytes]
    base_url: str
    key: str
    root: Path
    output: list[str]


def _read_until_ready(
    process: subprocess.Popen[bytes], lines: list[str], limit_s: float
) -> dict[str, str]:
    """The SAIA_* lines, once the whole ready block (up to the chat page line) is printed."""
    # Raw reads on the pipe: a buffered readline would hide lines from the selector.
    assert process.stdout is not None
    fd, pending, found = process.stdout.fileno(), b"", {}
    deadline = time.monotonic() + limit_s
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while not any(line.startswith("chat page:") for line in lines):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or process.poll() is not None:
                pytest.fail(f"demo did not come up (exit {process.poll()}): {lines}")
            if not selector.select(timeout=min(remaining, 1.0)):
                continue
            pending += os.read(fd, 65536)
            *complete, pending = pending.split(b"\n")
            for raw in complete:
                lines.append(raw.decode())
                name, sep, value = lines[-1].partition("=")
                if sep and name in ("SAIA_BASE_URL", "SAIA_API_KEY"):
                    found[name] = value
    return found


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmdline:
                found.append(f"{entry.name}: {cmdline}")
    return found


@contextlib.contextmanager
def running_demo(
    root: Path, *options: str, limit_s: float = START_TIMEOUT
) -> Iterator[RunningDemo]:
    port = str(free_port())
    argv = [sys.executable, "-m", "saia", "demo", "--port", port, "--dir", str(root), *options]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    lines: list[str] = []
    try:
        found = _read_until_ready(process, lines, limit_s)
        yield RunningDemo(process, found["SAIA_BASE_URL"], found["SAIA_API_KEY"], root, lines)
    finally:
        stop_process(process, 90, stop_signal=signal.SIGINT)  # Ctrl-C: the demo cleans up


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDemo]:
    with running_demo(tmp_path_factory.mktemp("demo")) as running:
        yield running


@pytest.fixture
def client(demo: RunningDemo) -> openai.OpenAI:
    return openai.OpenAI(base_url=demo.base_url, api_key=demo.key, max_retries=0, timeout=60)


def test_prints_curl_and_chat_page(demo: RunningDemo) -> None:
    text = "\n".join(demo.output)
    assert "curl " + demo.base_url + "/chat/completions" in text
    assert "/chat/" in text
    page = httpx.get(demo.base_url.removesuffix("/v1") + "/chat/", timeout=10)
    assert page.status_code == 200 and "<html" in page.text.lower()


def test_curl_gets_a_chat_completion(demo: RunningDemo) -> None:
    done = subprocess.run(
        ["curl", "-sS", "--max-time", "60", f"{demo.base_url}/chat/completions",
         "-H", f"Authorization: Bearer {demo.key}", "-H", "Content-Type: application/json",
         "-d", '{"model": "demo", "messages": [{"role": "user", "content": "Hello!"}]}'],
        capture_output=True, text=True, timeout=90, check=True,
    )  # fmt: skip
    assert '"chat.completion"' in done.stdout and "Hello!" in done.stdout


def test_models_carry_live_status(client: openai.OpenAI) -> None:
    models = {model.id: model for model in client.models.list()}
    demo_model = models["demo"].model_dump()
    assert demo_model["status"] == "ready"
    assert demo_model["input"] == ["text"] and isinstance(demo_model["demand"], int | float)


def test_chat_stream_and_usage(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "one two three"}]
    )
    assert "one two three" in (reply.choices[0].message.content or "")
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    chunks = list(
        client.chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": "count to five please"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "count to five please" in text
    assert len([c for c in chunks if c.choices]) > 3, "the answer arrived in several chunks"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0


def test_completion_and_embeddings(client: openai.OpenAI) -> None:
    completion = client.completions.create(model="demo", prompt="to be or not", max_tokens=5)
    assert completion.choices[0].text
    embedding = client.embeddings.create(model="demo", input=["a", "b"])
    assert len(embedding.data) == 2 and len(embedding.data[0].embedding) > 0


def test_errors_map_to_client_exceptions(demo: RunningDemo, client: openai.OpenAI) -> None:
    bad = openai.OpenAI(base_url=demo.base_url, api_key="sk-saia-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "x"}]
        )
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="demo", messages="not a list")  # type: ignore[arg-type]


def test_ctrl_c_stops_everything(demo: RunningDemo) -> None:
    demo.process.send_signal(signal.SIGINT)
    assert demo.process.wait(90) == 0
    leftovers = _processes_mentioning(str(demo.root))
    assert leftovers == [], leftovers
    assert os.path.isdir(demo.root)


def test_local_mode_without_slurm_or_ssh(tmp_path: Path) -> None:
    with running_demo(tmp_path, "--local") as local:
        client = openai.OpenAI(base_url=local.base_url, api_key=local.key, max_retries=0)
        reply = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "local hello"}]
        )
        assert "local hello" in (reply.choices[0].message.content or "")
        assert not (tmp_path / "slurm").exists() and not (tmp_path / "sshd").exists()
        local.process.send_signal(signal.SIGINT)
        assert local.process.wait(90) == 0
    assert _processes_mentioning(str(tmp_path)) == []


@pytest.mark.vllm
def test_vllm_mode_serves_real_vllm(tmp_path: Path, vllm_install: object) -> None:
    """`saia demo --vllm`: SmolLM2-135M-Instruct in a real vllm serve job, through the same
    chain, answers a factual question."""
    with running_demo(tmp_path, "--vllm", limit_s=900) as demo:
        assert '"model": "smollm2-135m-instruct"' in "\n".join(demo.output)  # the curl line
        client = openai.OpenAI(base_url=demo.base_url, api_key=demo.key, max_retries=0)
        question = "What is the capital of France? Answer in one word."
        reply = client.chat.completions.create(
            model="smollm2-135m-instruct",
            temperature=0,  # greedy: the same answer on every run
            max_tokens=20,
            messages=[{"role": "user", "content": question}],
        )
        assert "Paris" in (reply.choices[0].message.content or "")
        assert (reply.system_fingerprint or "").startswith("vllm-")
        assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 20
        demo.process.send_signal(signal.SIGINT)
        assert demo.process.wait(120) == 0
    assert _processes_mentioning(str(tmp_path)) == []
