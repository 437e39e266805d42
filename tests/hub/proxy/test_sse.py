"""SSE usage parsing and stripping: incremental, at any split of the byte stream."""

from __future__ import annotations

import itertools
import json

from hypothesis import given
from hypothesis import strategies as st

from hub.proxy.sse import Usage, UsageTap, may_matter, usage_from_body


def event(payload: object) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


TOKENS = [
    event(
        {"object": "chat.completion.chunk", "choices": [{"delta": {"content": w}}], "usage": None}
    )
    for w in ("one", " two", ' "usage" in text', " three")
]
USAGE = event(
    {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}}
)
STREAM = b"".join(TOKENS) + USAGE + b"data: [DONE]\n\n"


def run(tap: UsageTap, pieces: list[bytes]) -> bytes:
    return b"".join(tap.feed(piece) for piece in pieces) + tap.flush()


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def test_strips_the_unasked_usage_chunk_and_keeps_the_rest_byte_for_byte() -> None:
    tap = UsageTap("none")
    assert run(tap, [STREAM]) == b"".join(TOKENS) + b"data: [DONE]\n\n"
    assert tap.usage == Usage(7, 4)


def test_keeps_the_usage_chunk_when_the_client_asked() -> None:
    tap = UsageTap("final")
    assert run(tap, [STREAM]) == STREAM
    assert tap.usage == Usage(7, 4)


def test_complete_events_are_forwarded_at_once() -> None:
    tap = UsageTap("none")
    assert tap.feed(TOKENS[0]) == TOKENS[0]
    assert tap.feed(TOKENS[1][:5]) == b""  # an incomplete event waits for its end
    assert tap.feed(TOKENS[1][5:]) == TOKENS[1]


def test_crlf_separators() -> None:
    data = STREAM.replace(b"\n\n", b"\r\n\r\n")
    tap = UsageTap("none")
    out = run(tap, [data[:50], data[50:]])
    assert tap.usage == Usage(7, 4) and b'"usage": {' not in out and out.endswith(b"[DONE]\r\n\r\n")


def test_error_events_are_noticed_and_forwarded() -> None:
    error = event({"object": "error", "error": {"message": "backend died", "code": 502}})
    tap = UsageTap("none")
    assert run(tap, [TOKENS[0] + error]) == TOKENS[0] + error
    assert tap.error == "backend died"


@given(st.lists(st.integers(min_value=0), max_size=12), st.booleans())
def test_any_split_gives_the_same_output(cuts: list[int], strip: bool) -> None:
    whole = UsageTap("none" if strip else "final")
    expected = run(whole, [STREAM])
    pieces = UsageTap("none" if strip else "final")
    assert run(pieces, split(STREAM, cuts)) == expected
    assert pieces.usage == whole.usage == Usage(7, 4)


def test_only_events_with_a_usage_object_or_an_error_are_parsed() -> None:
    assert not any(may_matter(token) for token in TOKENS)  # "usage": null, "usage" in text
    assert not may_matter(b'data: {"choices":[],"usage":null}\n\n')
    assert may_matter(USAGE)
    assert may_matter(b'data: {"usage":null,"x":{"usage":{"prompt_tokens":1}}}\n\n')
    assert may_matter(b'data: {"error":{"message":"m"}}\n\n')


def test_usage_of_complete_bodies() -> None:
    assert usage_from_body(b'{"usage": {"prompt_tokens": 3, "completion_tokens": 1}}') == Usage(
        3, 1
    )
    assert usage_from_body(b'{"usage": {"prompt_tokens": 3}}') == Usage(3, 0)  # embeddings
    assert usage_from_body(b"not json") is None
    assert usage_from_body(b'{"usage": null}') is None


def vllm_chunk(text: str, done: int, spaced: bool = False) -> bytes:
    """A vLLM token chunk with continuous usage (compact JSON; `spaced`: another server's)."""
    payload = {
        "id": "c",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": text}}],
        "usage": {"prompt_tokens": 7, "total_tokens": 7 + done, "completion_tokens": done},
    }
    separators = (", ", ": ") if spaced else (",", ":")
    return b"data: " + json.dumps(payload, separators=separators).encode() + b"\n\n"


PER_CHUNK = [vllm_chunk(" a", 1), vllm_chunk(' "usage"', 2), vllm_chunk(" b", 3, spaced=True)]
PER_CHUNK_STREAM = b"".join(PER_CHUNK) + USAGE + b"data: [DONE]\n\n"


@given(st.lists(st.integers(min_value=0), max_size=12))
def test_usage_on_every_chunk_is_read_and_shown_only_if_asked(cuts: list[int]) -> None:
    """Read on every chunk (a client that leaves mid-stream pays for what it got), shown
    only to a client that asked for it: "all" every chunk, "final" the last, "none" none."""
    pieces = split(PER_CHUNK_STREAM, cuts)
    shown = {wish: run(UsageTap(wish), pieces) for wish in ("none", "final", "all")}
    assert shown["all"] == PER_CHUNK_STREAM
    assert b'"usage"' not in shown["none"].replace(b'\\"usage\\"', b"")
    assert shown["final"] == shown["none"].replace(b"data: [DONE]", USAGE + b"data: [DONE]")
    contents = [json.loads(line[6:])["choices"][0]["delta"]["content"] for line in
                shown["none"].split(b"\n\n") if line.startswith(b"data: {")]  # fmt: skip
    assert contents == [" a", ' "usage"', " b"]
    tap = UsageTap("none")
    run(tap, split(b"".join(PER_CHUNK[:2]), cuts))  # the client left after two chunks
    assert tap.usage == Usage(7, 2) and tap.estimate == Usage(7, 2)


def test_without_any_usage_each_event_counts_one_token() -> None:
    tap = UsageTap("none")
    run(tap, [TOKENS[0], TOKENS[1], b"data: [DONE]\n\n"])
    assert tap.usage is None and tap.estimate == Usage(0, 2)
