"""The client's body as the upstream gets it (pure; the real-hub tests are in
test_proxy_faults.py and tests/hub/test_api.py)."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest

from hub.config import ModelConfig
from hub.errors import ApiError
from hub.proxy.request_body import ask_for_usage, parse_request, rewrite

PLAIN = ModelConfig.model_validate({"id": "m", "upstream": "u"})


def _rewrite(body: bytes, model: ModelConfig = PLAIN, per_chunk: bool = False) -> Any:
    return rewrite(json.loads(body), body, model, "completions", per_chunk)


def test_usage_is_requested_and_the_clients_wish_remembered() -> None:
    body, wish = ask_for_usage({"stream": True, "stream_options": None}, per_chunk=False)
    assert body["stream_options"] == {"include_usage": True} and wish == "none"
    options = {"include_usage": True, "x": 1}
    body, wish = ask_for_usage({"stream_options": options}, per_chunk=True)
    assert body["stream_options"] == {**options, "continuous_usage_stats": True}
    assert wish == "final"
    options = {"include_usage": True, "continuous_usage_stats": True}
    assert ask_for_usage({"stream_options": options}, per_chunk=False)[1] == "all"


def test_an_unchanged_body_is_forwarded_byte_for_byte_unless_model_is_ambiguous() -> None:
    body = b'{"model": "m",  "messages": [{"role": "user", "content": "hi"}]}'
    assert _rewrite(body).body == body
    for ambiguous in (
        b'{"model": "m", "model": "m"}',  # parsers differ on which one counts
        b'{"model": "m", "mod\\u0065l": "m"}',
    ):
        assert _rewrite(ambiguous).body == b'{"model":"m"}'
    capped = ModelConfig.model_validate(
        {"id": "m", "upstream": "u", "hooks": {"max_tokens_cap": 5}}
    )
    body = b'{"model": "m", "max_tokens": 50}'
    assert _rewrite(body, capped).body == b'{"model":"m","max_tokens":5}'
    streamed = _rewrite(b'{"model": "m", "stream": true}', per_chunk=True)
    assert streamed.stream and streamed.usage_wish == "none"
    assert b'"include_usage":true,"continuous_usage_stats":true' in streamed.body


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"model": "m", "stream": 1}', "stream"),
        (b'{"model": "m", "stream": 1.0}', "stream"),
        (b'{"model": "m", "stream": "true"}', "stream"),
        (b'{"model": "m", "stream": true, "stream_options": "x"}', "stream_options"),
        (
            b'{"model": "m", "stream": true, "stream_options": {"include_usage": 1}}',
            "stream_options.include_usage",
        ),
        (
            b'{"model": "m", "stream_options": {"continuous_usage_stats": "yes"}}',
            "stream_options.continuous_usage_stats",
        ),
    ],
)
def test_stream_fields_are_json_booleans_or_refused(body: bytes, param: str) -> None:
    with pytest.raises(ApiError) as refused:
        _rewrite(body)
    assert refused.value.status == 400 and refused.value.param == param


def test_null_and_false_do_not_stream() -> None:
    for body in (b'{"model": "m", "stream": null}', b'{"model": "m", "stream": false}'):
        assert not _rewrite(body).stream


def test_nesting_too_deep_to_decode_or_encode_is_a_400() -> None:
    with pytest.raises(ApiError) as refused:
        parse_request(b"[" * 200_000)
    assert refused.value.status == 400 and refused.value.code == "invalid_json"
    # The decoder stops at the recursion limit; a body that decoded just below it (from a
    # shallower stack) can still fail to encode: that too is the client's 400, not a 500.
    nested: list[Any] = []
    for _ in range(sys.getrecursionlimit() - 10):
        nested = [nested]
    payload = {"model": "m", "x": nested, "stream": True}
    with pytest.raises(ApiError) as refused:
        rewrite(payload, b"", PLAIN, "completions", False)
    assert refused.value.status == 400 and refused.value.code == "invalid_json"
