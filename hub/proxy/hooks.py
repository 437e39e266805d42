"""Request hooks configured per model: pure rewriting of the decoded request body."""

from __future__ import annotations

from typing import Any

from hub.config import HooksConfig

_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")


def apply_hooks(payload: dict[str, Any], hooks: HooksConfig, endpoint: str) -> dict[str, Any]:
    """A new body with the model's defaults, caps and system prompt applied."""
    out = dict(payload)
    for name, value in hooks.defaults.items():
        out.setdefault(name, value)
    if hooks.max_tokens_cap is not None and endpoint in ("chat/completions", "completions"):
        cap = hooks.max_tokens_cap
        present = [name for name in _TOKEN_FIELDS if out.get(name) is not None]
        for name in present:
            value = out[name]
            if isinstance(value, int) and not isinstance(value, bool) and value > cap:
                out[name] = cap
        if not present:
            out["max_tokens"] = cap
    messages = out.get("messages")
    if hooks.system_prompt and endpoint == "chat/completions" and isinstance(messages, list):
        out["messages"] = [{"role": "system", "content": hooks.system_prompt}, *messages]
    return out
