"""The one interface every upstream (OpenAI-compatible provider, HPC site) implements."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Literal, Protocol

ModelStatus = Literal["ready", "loading", "offline"]


@dataclass(frozen=True)
class UpstreamRequest:
    method: str
    path: str  # e.g. /v1/chat/completions (or /tokenize)
    body: bytes | AsyncIterable[bytes]  # pieces: an upload streamed on (sent only once)
    model: str  # the upstream's name for the model
    request_id: str
    # Who asks (from the hub's authentication) and the request class: an HPC upstream
    # passes them to the agent's fair queue; a client never sets them directly.
    user: str = ""
    key_id: str = ""
    group: str = ""
    priority: str = ""  # "" (interactive) or "batch"
    content_type: str = "application/json"  # multipart/form-data (with its boundary): audio


@dataclass(frozen=True)
class UpstreamResponse:
    status: int
    headers: list[tuple[str, str]]
    chunks: AsyncIterator[bytes]


@dataclass(frozen=True)
class ModelState:
    status: ModelStatus
    demand: float
    name: str | None = None  # a display name the upstream reports
    queued: int = 0  # requests waiting for a slot (the agent's fair queue)
    oldest_wait: float = 0.0  # seconds the longest-waiting of them has waited
    endpoints: tuple[str, ...] | None = None  # what the service serves (None: not said)
    input: tuple[str, ...] | None = None  # modalities the agent announces
    output: tuple[str, ...] | None = None
    instances: int = 0  # ready backends, summed over sites (the agents' listings)
    starting: int = 0  # their jobs that are starting
    predicted_wait: float | None = None  # s until a loading model serves (soonest site)


class UpstreamError(Exception):
    """The upstream failed; `status` is what the client gets (502, 503, 504)."""

    def __init__(self, status: int, message: str, code: str = "upstream_error") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


class UpstreamUnavailable(UpstreamError):
    """Nothing was sent yet: another site may be tried."""


class UpstreamTimeout(UpstreamError):
    def __init__(self, message: str) -> None:
        super().__init__(504, message, "upstream_timeout")


class Upstream(Protocol):
    name: str
    default_status: ModelStatus  # of a model the live state does not mention
    # Reports usage on every streamed chunk when asked (vLLM's continuous_usage_stats), so
    # a client that leaves mid-stream is charged exactly what was generated.
    usage_per_chunk: bool

    def stream(self, request: UpstreamRequest) -> AbstractAsyncContextManager[UpstreamResponse]:
        """Send the request; the response head is available on enter, the body streams."""
        ...

    async def states(self) -> dict[str, ModelState]:
        """Live state per upstream model name; models not listed count as ready."""
        ...


async def idle_limited(
    chunks: AsyncIterator[bytes], idle: float, upstream: str
) -> AsyncIterator[bytes]:
    """The chunks, failing with UpstreamTimeout when one takes longer than `idle`."""
    while True:
        try:
            async with asyncio.timeout(idle):
                chunk = await anext(chunks)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise UpstreamTimeout(f"upstream {upstream} sent nothing for {idle:g} s") from None
        yield chunk
