"""URLs and credentials of the openai upstream (plain and Azure)."""

from __future__ import annotations

import pytest

from hub.config import ConfigError, OpenAIUpstreamConfig
from hub.upstreams.openai import OpenAIUpstream, shared_client


async def test_plain_and_azure_urls_and_key_headers() -> None:
    async with shared_client(4) as client:
        plain = OpenAIUpstream(
            "p",
            OpenAIUpstreamConfig(kind="openai", base_url="https://x.org/v1", api_key_env="K"),
            client,
            {"K": "secret-1"},
        )
        assert plain._url("/v1/chat/completions") == "https://x.org/v1/chat/completions"
        assert plain._url("/tokenize") == "https://x.org/tokenize"
        assert plain._headers["authorization"] == "Bearer secret-1"
        azure_config = OpenAIUpstreamConfig.model_validate(
            {
                "kind": "openai",
                "base_url": "https://r.openai.azure.com/",
                "api_key_env": "A",
                "azure": {"deployment": "gpt4", "api_version": "2024-06-01"},
            }
        )
        azure = OpenAIUpstream("a", azure_config, client, {"A": "secret-2"})
        assert azure._url("/v1/chat/completions") == (
            "https://r.openai.azure.com/openai/deployments/gpt4/chat/completions"
            "?api-version=2024-06-01"
        )
        assert azure._headers["api-key"] == "secret-2" and "authorization" not in azure._headers
        with pytest.raises(ConfigError, match="environment variable A is not set"):
            OpenAIUpstream("a", azure_config, client, {})
