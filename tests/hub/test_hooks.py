"""Per-model request hooks: pure rewriting."""

from __future__ import annotations

import json

from hub.config import HooksConfig
from hub.hooks import apply_hooks, ask_for_usage


def test_system_prompt_cap_and_defaults() -> None:
    hooks = HooksConfig(system_prompt="Be kind.", max_tokens_cap=100, defaults={"temperature": 0.2})
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 500}
    out = apply_hooks(body, hooks, "chat/completions")
    assert out["messages"][0] == {"role": "system", "content": "Be kind."}
    assert out["max_tokens"] == 100 and out["temperature"] == 0.2
    assert body["max_tokens"] == 500 and len(body["messages"]) == 1  # input untouched


def test_cap_sets_a_bound_when_absent_and_keeps_smaller_values() -> None:
    hooks = HooksConfig(max_tokens_cap=50)
    assert apply_hooks({"prompt": "x"}, hooks, "completions")["max_tokens"] == 50
    kept = apply_hooks({"max_completion_tokens": 10}, hooks, "chat/completions")
    assert kept == {"max_completion_tokens": 10}
    assert apply_hooks({"input": "x"}, hooks, "embeddings") == {"input": "x"}


def test_client_values_win_over_defaults() -> None:
    hooks = HooksConfig(defaults={"temperature": 0.2})
    assert apply_hooks({"temperature": 1.0}, hooks, "completions")["temperature"] == 1.0


def test_usage_is_requested_and_the_clients_wish_remembered() -> None:
    body, asked = ask_for_usage({"stream": True, "stream_options": None})
    assert body["stream_options"] == {"include_usage": True} and not asked
    body, asked = ask_for_usage({"stream_options": {"include_usage": True, "x": 1}})
    assert body["stream_options"] == {"include_usage": True, "x": 1} and asked


def test_an_unchanged_body_is_forwarded_byte_for_byte_unless_model_is_ambiguous() -> None:
    from hub.config import ModelConfig
    from hub.proxy import _rewrite

    plain = ModelConfig.model_validate({"id": "m", "upstream": "u"})
    body = b'{"model": "m",  "messages": [{"role": "user", "content": "hi"}]}'
    assert _rewrite(json.loads(body), body, plain, "chat/completions")[0] == body
    for ambiguous in (
        b'{"model": "m", "model": "m"}',  # parsers differ on which one counts
        b'{"model": "m", "mod\\u0065l": "m"}',
    ):
        upstream = _rewrite(json.loads(ambiguous), ambiguous, plain, "chat/completions")[0]
        assert upstream == b'{"model":"m"}'
    capped = ModelConfig.model_validate(
        {"id": "m", "upstream": "u", "hooks": {"max_tokens_cap": 5}}
    )
    body = b'{"model": "m", "max_tokens": 50}'
    assert _rewrite(json.loads(body), body, capped, "completions")[0] == (
        b'{"model":"m","max_tokens":5}'
    )
    streamed = b'{"model": "m", "stream": true}'
    upstream, stream, asked = _rewrite(json.loads(streamed), streamed, plain, "completions")
    assert stream and not asked and b'"include_usage":true' in upstream
