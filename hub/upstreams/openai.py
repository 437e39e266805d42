"""Upstream: any OpenAI-compatible HTTP provider (or Azure OpenAI) over one shared client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager

from hub.config import ConfigError, OpenAIUpstreamConfig
from hub.upstreams.base import (
    ModelState,
    ModelStatus,
    UpstreamError,
    UpstreamRequest,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from saia.base.http11 import (
    BodyStream,
    ConnectFailed,
    HttpClient,
    HttpResponse,
    ResponseBroken,
    parse_url,
)


def shared_client(max_connections: int) -> HttpClient:
    """The one HTTP client of all openai upstreams (pooled keep-alive connections; never
    through a proxy from the environment, never following redirects)."""
    # Below the usual 5 s server-side keep-alive (uvicorn, vLLM): a connection is rarely
    # reused just as the server closes it (and then replaced once, before anything is sent).
    return HttpClient(max_connections, keepalive_expiry=2.0)


def _header_safe(value: str) -> bool:
    return not any(c in value for c in "\r\n\0")


class OpenAIUpstream:
    default_status: ModelStatus = "ready"  # a provider's models are taken as ready

    def __init__(
        self,
        name: str,
        config: OpenAIUpstreamConfig,
        client: HttpClient,
        environ: Mapping[str, str],
    ) -> None:
        self.name = name
        self.usage_per_chunk = config.usage_per_chunk
        self._config = config
        self._client = client
        self._headers = {"accept-encoding": "identity", "content-type": "application/json"}
        if config.api_key_env:
            key = environ.get(config.api_key_env)
            if not key:
                raise ConfigError(
                    f"upstream {name}: environment variable {config.api_key_env} is not set"
                )
            if not _header_safe(key):
                raise ConfigError(
                    f"upstream {name}: environment variable {config.api_key_env} holds a "
                    "line break or NUL"
                )
            if config.azure:
                self._headers["api-key"] = key
            else:
                self._headers["authorization"] = f"Bearer {key}"
        self._header_list = list(self._headers.items())
        self._urls: dict[str, str] = {}
        try:
            target = parse_url(self._url("/v1/models"))
        except ValueError as error:
            raise ConfigError(f"upstream {name}: base_url: {error}") from None
        if "@" in target.host_header or "@" in config.base_url.split("/", 3)[2]:
            raise ConfigError(f"upstream {name}: base_url: no credentials in the URL")

    def _url(self, path: str) -> str:
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = self._build_url(path)
        return url

    def _build_url(self, path: str) -> str:
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
        headers = [*self._header_list, ("x-request-id", request.request_id)]
        if request.content_type != "application/json":  # a multipart upload (audio)
            headers = [(k, request.content_type if k == "content-type" else v) for k, v in headers]
        timeouts = self._config.timeouts
        body = request.body
        # An upload is sent chunked as it arrives, not held whole.
        sent = body if isinstance(body, bytes) else BodyStream(body)
        opened = self._client.stream(
            request.method, self._url(request.path), headers, sent, timeouts.connect
        )
        async with AsyncExitStack() as stack:
            try:
                async with asyncio.timeout(timeouts.first_byte):
                    response = await stack.enter_async_context(opened)
            except TimeoutError:
                raise UpstreamTimeout(f"upstream {self.name} did not answer in time") from None
            except (ConnectFailed, ResponseBroken) as error:
                raise UpstreamUnavailable(
                    502, f"cannot reach upstream {self.name}: {type(error).__name__}"
                ) from None
            yield UpstreamResponse(response.status, response.headers, self._raw(response))

    async def _raw(self, response: HttpResponse) -> AsyncIterator[bytes]:
        idle = self._config.timeouts.idle
        try:
            async for chunk in response.chunks(idle):
                yield chunk
        except TimeoutError:
            raise UpstreamTimeout(f"upstream {self.name} sent nothing for {idle:g} s") from None
        except ResponseBroken:
            raise UpstreamError(502, f"upstream {self.name} broke off") from None

    async def states(self) -> dict[str, ModelState]:
        return {}
