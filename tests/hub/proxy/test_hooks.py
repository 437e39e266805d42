"""Per-model request hooks: pure rewriting."""

from __future__ import annotations

from hub.config import HooksConfig
from hub.proxy.hooks import apply_hooks


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
