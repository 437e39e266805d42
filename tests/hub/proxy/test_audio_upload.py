"""Audio uploads through a real hub (uvicorn, openai upstream) to a stand-in: the form's
`model` field found by its part headers in either order, renamed for an alias at its exact
place, the upload passed as sent (streamed on for the hop:
tests/hub/upstreams/test_hop_streamed_body.py); an unknown or missing model refused (before
the upload is read when the model comes first: tests/hub/proxy/test_multipart_body.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.fixtures.standin import StandinProcess
from tests.hub.helpers import hub_config, running_hub

BOUNDARY = "saia-test-boundary"
UPLOAD = bytes(range(256)) * 400  # 100 kB of "audio"


def part(name: str, value: bytes, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"


def form(*parts: bytes) -> bytes:
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


async def test_uploads_in_either_order_with_an_alias(
    tmp_path: Path, standin_factory: Callable[..., StandinProcess]
) -> None:
    server = standin_factory("whisper-real")
    models = [{"id": "whisper", "upstream": "local", "upstream_model": "whisper-real"}]
    config = hub_config(tmp_path, server.url, "whisper-real", models=models)
    headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    async with running_hub(config) as hub, hub.client(await hub.create_key()) as http:
        model_first = form(part("model", b"whisper"), part("file", UPLOAD, "a.wav"))
        file_first = form(part("file", UPLOAD, "a.wav"), part("model", b"whisper"))
        for body in (model_first, file_first):
            answer = await http.post("/v1/audio/transcriptions", content=body, headers=headers)
            assert answer.status_code == 200, answer.text
            assert answer.json()["text"] == f"transcribed {len(UPLOAD)} bytes of audio"
        unknown = form(part("model", b"nobody"), part("file", UPLOAD, "a.wav"))
        refused = await http.post("/v1/audio/transcriptions", content=unknown, headers=headers)
        # text in the upload that looks like a model part is not taken for one
        tricky = form(part("file", part("model", b"whisper"), "a.wav"))
        missing = await http.post("/v1/audio/transcriptions", content=tricky, headers=headers)
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found"
    assert missing.status_code == 400 and missing.json()["error"]["code"] == "missing_model"
