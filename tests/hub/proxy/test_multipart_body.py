"""The `model` field of an audio upload, found by the form's part headers while the body
streams in (hub/proxy/multipart_body.py): pure, on bodies as the OpenAI SDK and curl send them."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from hub.errors import ApiError
from hub.proxy.multipart_body import ModelPart, read_model, renamed, whole_body

BOUNDARY = "b0undary-xyz"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
# A file whose bytes look like a model part: the old byte search took them for one.
TRICKY = (
    f'\r\n--{BOUNDARY}x\r\nContent-Disposition: form-data; name="model"\r\n\r\nfake\r\n'
).encode() + bytes(range(256)) * 4


def part(name: str, value: bytes, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"


def form(*parts: bytes) -> bytes:
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def pieces(body: bytes, size: int) -> list[bytes]:
    return [body[i : i + size] for i in range(0, len(body), size)]


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 16, 61, 4096])
def test_the_model_is_found_by_part_headers_at_its_exact_place(size: int) -> None:
    """File first (curl -F file=@.. -F model=..), its content mimicking a model part, in
    pieces of every size (a boundary may straddle two pieces)."""
    body = form(
        part("file", TRICKY, filename="a.wav"),
        part("model", b"whisper-1"),
        part("language", b"en"),
    )
    found = ModelPart(CONTENT_TYPE)
    done = [found.feed(piece) for piece in pieces(body, size)]
    assert found.model == "whisper-1"
    assert body[found.where] == b"whisper-1"
    assert done.index(True) < len(done) - 1 or size >= len(body)  # stops before the end
    alias = renamed(body, found.where, "openai/whisper-large-v3")
    assert alias == body.replace(b"\r\n\r\nwhisper-1\r\n", b"\r\n\r\nopenai/whisper-large-v3\r\n")


def test_a_file_part_named_model_is_not_the_model() -> None:
    body = form(part("model", b"not-this", filename="model.txt"), part("model", b"m"))
    found = ModelPart(CONTENT_TYPE)
    found.feed(body)
    assert (found.model, body[found.where]) == ("m", b"m")


async def chunks_of(body: bytes, size: int, pulled: list[int]) -> AsyncIterator[bytes]:
    for piece in pieces(body, size):
        pulled.append(len(piece))
        yield piece


async def test_reading_stops_at_the_model_when_it_comes_first() -> None:
    """The OpenAI SDK sends fields first: the upload is not read to know the model, and
    the rest is then read on from where it stopped."""
    upload = b"\x00" * 100_000
    body = form(part("model", b"whisper-1"), part("file", upload, filename="a.wav"))
    pulled: list[int] = []
    chunks = chunks_of(body, 1000, pulled)
    model, where, head = await read_model(chunks, CONTENT_TYPE, limit=1_000_000)
    assert model == "whisper-1" and sum(pulled) <= 1000
    start = b"".join(head)
    streamed = [piece async for piece in whole_body(start, len(start), chunks, 1_000_000)]
    assert b"".join(streamed) == body and len(streamed) > 50  # piece by piece, not whole
    assert body[where] == b"whisper-1"
    pulled.clear()
    chunks = chunks_of(body, 1000, pulled)
    _model, _where, head = await read_model(chunks, CONTENT_TYPE, limit=50_000)
    with pytest.raises(ApiError) as refused:
        async for _piece in whole_body(head[0], len(head[0]), chunks, 50_000):
            pass
    assert refused.value.status == 413 and sum(pulled) <= 51_000  # stops at the bound


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        (form(part("file", b"x", filename="a.wav")), CONTENT_TYPE, 400, "missing_model"),
        (form(part("model", b"  ")), CONTENT_TYPE, 400, "missing_model"),
        (form(part("model", b"\xff\xfe")), CONTENT_TYPE, 400, "invalid_form"),
        (form(part("model", b"m" * 300)), CONTENT_TYPE, 400, "invalid_form"),
        (b"not a form at all", CONTENT_TYPE, 400, "invalid_form"),
        (form(part("model", b"m")), "application/json", 400, "invalid_request"),
        (form(part("model", b"m")), "multipart/form-data", 400, "invalid_request"),
        (
            form(part("file", b"x" * 5000, filename="a"), part("model", b"m")),
            CONTENT_TYPE,
            413,
            "body_too_large",
        ),
    ],
)
async def test_bad_forms_are_refused(
    body: bytes, content_type: str, status: int, code: str
) -> None:
    with pytest.raises(ApiError) as refused:
        await read_model(chunks_of(body, 64, []), content_type, limit=4096)
    assert (refused.value.status, refused.value.code) == (status, code)
