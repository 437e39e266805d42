"""Audio uploads through the whole chain: a real hub (uvicorn) -> HopClient -> the real sshd
with the forced-command relay -> the agent's router -> a stand-in model server.

A multipart upload of several MiB streams through end to end and is answered correctly,
while the agent holds at most about one flow-control window of it at any time (its
session's own accounting, sampled after every frame). A large request the agent refuses
at its head (503) reaches the client as that 503, not as a 504 after the hub's first-byte
timeout (the hub waited for credit the agent never granted).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hpc.config import AgentConfig, RouterConfig, ServiceConfig
from hpc.registry import Backend, BackendRegistry
from hpc.router import server, session
from hub.config import HubConfig, parse_config
from saia.base import protocol as wire
from saia.sandbox.sshd import SshdSandbox
from tests.fixtures.standin import StandinProcess
from tests.hpc.router.test_router_ssh import running_router
from tests.hub.helpers import running_hub

pytestmark = pytest.mark.ssh

MODEL = "listener"
MiB = 1024 * 1024
BOUNDARY = "saia-chain-boundary"


def hub_config(tmp_path: Path, sshd: SshdSandbox) -> HubConfig:
    site = {
        "host": sshd.host, "port": sshd.port, "user": sshd.user,
        "client_key": str(sshd.client_key), "known_hosts": str(sshd.known_hosts),
    }  # fmt: skip
    return parse_config(
        {
            "data_dir": str(tmp_path / "hub-data"),
            "usage_flush_interval": 0.2,
            "max_body_bytes": 64 * MiB,
            "upstreams": {
                "cluster": {
                    "kind": "hpc",
                    "sites": [site],
                    "timeouts": {"connect": 5, "first_byte": 8, "idle": 30},
                    "services_ttl": 0,
                }
            },
            "models": [
                {"id": MODEL, "upstream": "cluster", "endpoints": ["transcriptions"]},
                {"id": "talker", "upstream": "cluster"},
            ],
        }
    )


def agent_config(sshd: SshdSandbox) -> AgentConfig:
    return AgentConfig(
        state_dir=sshd.state_dir,
        services=[
            ServiceConfig(name=MODEL, model=MODEL, endpoints=["transcriptions"]),
            ServiceConfig(name="talker", model="talker"),
        ],
        router=RouterConfig(max_body_bytes=64 * MiB),
    )


def multipart(audio: bytes) -> bytes:
    def part(name: str, value: bytes, filename: str = "") -> bytes:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        head = f"--{BOUNDARY}\r\ncontent-disposition: {disposition}\r\n\r\n"
        return head.encode() + value + b"\r\n"

    return (
        part("model", MODEL.encode())
        + part("file", audio, "a.wav")
        + f"--{BOUNDARY}--\r\n".encode()
    )


class Sampled(session.Session):
    """The agent's session, its held bytes sampled after every frame it handles."""

    peak_held = 0
    finished: list[tuple[int, int]] = []  # (received, peak queued) per upload

    def dispatch(self, frame: wire.Frame) -> None:
        super().dispatch(frame)
        Sampled.peak_held = max(Sampled.peak_held, self.held)

    def finish_upload(self, incoming: session.Incoming, upload: Any) -> None:
        super().finish_upload(incoming, upload)
        Sampled.finished.append((upload.received, upload.peak))


async def test_a_large_upload_streams_through_the_chain_with_a_window_held(
    tmp_path: Path,
    sshd: SshdSandbox,
    standin_factory: Callable[..., StandinProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(server, "Session", Sampled)
    Sampled.peak_held, Sampled.finished = 0, []
    backend = standin_factory(MODEL)
    audio = bytes(range(256)) * (48 * 1024)  # 12 MiB
    body = multipart(audio)
    registry = BackendRegistry()
    registry.publish(MODEL, [Backend(MODEL, "job-1", backend.url)])
    headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    async with (
        running_router(agent_config(sshd), registry),
        running_hub(hub_config(tmp_path, sshd)) as hub,
        hub.client(await hub.create_key()) as http,
    ):
        answer = await http.post(
            "/v1/audio/transcriptions", content=body, headers=headers, timeout=120
        )
    assert answer.status_code == 200, answer.text
    assert answer.json()["text"] == f"transcribed {len(audio)} bytes of audio"
    [(received, queued)] = Sampled.finished
    assert received == len(body)
    # The agent held at most about one window (1 MiB) of the 12 MiB, never the body.
    assert 0 < queued <= wire.INITIAL_WINDOW
    assert Sampled.peak_held <= wire.INITIAL_WINDOW + 4 * session.HEAD_COST
    print(f"upload {len(body)} bytes: agent peak held {Sampled.peak_held}, queued {queued}")


async def test_a_large_request_refused_at_its_head_is_a_503_not_a_504(
    tmp_path: Path,
    sshd: SshdSandbox,
    standin_factory: Callable[..., StandinProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every stream is refused at REQUEST (too many streams: none allowed here), as the agent
    does when the hub has max_streams streams open; the hub sends 2 MiB first (beyond the
    stream's 1 MiB window): JSON as bytes, and an upload as it streams in."""
    monkeypatch.setattr(server, "MAX_STREAMS", 0)
    registry = BackendRegistry()
    registry.publish(MODEL, [Backend(MODEL, "job-1", standin_factory(MODEL).url)])
    words = " ".join(["word"] * (2 * MiB // 5))
    chat = {"model": "talker", "messages": [{"role": "user", "content": words}]}
    headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    upload = multipart(b"a" * 2 * MiB)
    async with (
        running_router(agent_config(sshd), registry),
        running_hub(hub_config(tmp_path, sshd)) as hub,
        hub.client(await hub.create_key()) as http,
        asyncio.timeout(60),
    ):
        refused_json = await http.post("/v1/chat/completions", json=chat, timeout=30)
        path = "/v1/audio/transcriptions"
        refused_upload = await http.post(path, content=upload, headers=headers, timeout=30)
    for refused in (refused_json, refused_upload):
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "too_many_streams", refused.text
