"""Upstream: any OpenAI-compatible HTTP provider (or Azure OpenAI) over one shared client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import httpx

from hub.config import ConfigError, OpenAIUpstreamConfig
from hub.upstream import (
    ModelState,
    ModelStatus,
    UpstreamError,
    UpstreamRequest,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamUnavailable,
    idle_limited,
)


def shared_client(max_connections: int) -> httpx.AsyncClient:
    """The one HTTP client of all openai upstreams (pooled keep-alive connections)."""
    return httpx.AsyncClient(
        limits=httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            # Below the usual 5 s server-side keep-alive (uvicorn, vLLM): a connection is
            # never reused just as the server closes it.
            keepalive_expiry=2.0,
        ),
        trust_env=False,  # never route upstream traffic through a proxy from the environment
        follow_redirects=False,
    )


class OpenAIUpstream:
    default_status: ModelStatus = "ready"  # a provider's models are taken as ready

    def __init__(
        self,
        name: str,
        config: OpenAIUpstreamConfig,
        client: httpx.AsyncClient,
        environ: Mapping[str, str],
    ) -> None:
        self.name = name
        self._config = config
        self._client = client
        timeouts = config.timeouts
        self._timeout = httpx.Timeout(
            connect=timeouts.connect,
            read=max(timeouts.first_byte, timeouts.idle),
            write=timeouts.idle,
            pool=timeouts.connect,
        )
        self._headers = {"accept-encoding": "identity", "content-type": "application/json"}
        if config.api_key_env:
            key = environ.get(config.api_key_env)
            if not key:
                raise ConfigError(
                    f"upstream {name}: environment variable {config.api_key_env} is not set"
                )
            if config.azure:
                self._headers["api-key"] = key
            else:
                self._headers["authorization"] = f"Bearer {key}"

    def _url(self, path: str) -> str:
        base = self._config.base_url
        azure = self._config.azure
        if azure is not None:
            endpoint = path.removeprefix("/v1")
            return (
                f"{base}/openai/deployments/{azure.deployment}{endpoint}"
                f"?api-version={azure.api_version}"
            )
        if path.startswith("/v1/") and base.endswith("/v1"):
            return base + path[3:]
        return base.removesuffix("/v1") + path

    @asynccontextmanager
    async def stream(self, request: UpstreamRequest) -> AsyncIterator[UpstreamResponse]:
        headers = {**self._headers, "x-request-id": request.request_id}
        http_request = self._client.build_request(
            request.method,
            self._url(request.path),
            headers=headers,
            content=request.body,
            timeout=self._timeout,
        )
        try:
            async with asyncio.timeout(self._config.timeouts.first_byte):
                response = await self._client.send(http_request, stream=True)
        except (TimeoutError, httpx.TimeoutException):
            raise UpstreamTimeout(f"upstream {self.name} did not answer in time") from None
        except httpx.TransportError as error:
            raise UpstreamUnavailable(
                502, f"cannot reach upstream {self.name}: {type(error).__name__}"
            ) from None
        try:
            chunks = idle_limited(self._raw(response), self._config.timeouts.idle, self.name)
            yield UpstreamResponse(response.status_code, response.headers.multi_items(), chunks)
        finally:
            await response.aclose()

    async def _raw(self, response: httpx.Response) -> AsyncIterator[bytes]:
        try:
            async for chunk in response.aiter_raw():
                yield chunk
        except httpx.TimeoutException:
            raise UpstreamTimeout(f"upstream {self.name} stopped sending") from None
        except httpx.TransportError as error:
            raise UpstreamError(
                502, f"upstream {self.name} broke off: {type(error).__name__}"
            ) from None

    async def states(self) -> dict[str, ModelState]:
        return {}
