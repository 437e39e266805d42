"""The hub: OpenAI-compatible gateway with keys, limits, accounting and upstreams."""
