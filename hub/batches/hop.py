"""The hub's side of batches on an agent: the reserved hop paths /saia/batches/...

Every call is one request stream (service "") on the site's `HopClient`, with a first-byte
timeout; the input goes up in pieces of `chunk` bytes (one stream each, at an offset the
agent checks), so neither side holds a whole file; the output streams down.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from hub.upstreams.hop_client import HopClient, HopError

PREFIX = "/saia/batches/"
JSON = [("content-type", "application/json")]


class AgentBatchError(Exception):
    """The agent refused or could not be asked; str() says why, `status` its HTTP status."""

    def __init__(self, message: str, status: int = 502) -> None:
        super().__init__(message)
        self.status = status


class AgentBatches:
    def __init__(self, client: HopClient, timeout: float) -> None:
        self._client, self._timeout = client, timeout

    async def call(
        self, method: str, path: str, body: bytes = b"", headers: list[tuple[str, str]] = JSON
    ) -> dict[str, Any]:
        """A small JSON exchange; AgentBatchError unless the agent answers 200."""
        try:
            opened = self._client.stream(
                "", method, PREFIX + path, headers, body, first_byte_timeout=self._timeout
            )
            async with opened as response:
                answer = b"".join([chunk async for chunk in response.aiter_bytes()])
        except HopError as error:  # HopUnavailable, HopTimeout and the rest
            raise AgentBatchError(f"the agent could not be asked: {error}", 503) from None
        try:
            data = json.loads(answer)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise AgentBatchError(f"the agent answered {response.status} without JSON")
        if response.status != 200:
            message = str((data.get("error") or {}).get("message", "no reason given"))
            raise AgentBatchError(f"the agent refused: {message}", response.status)
        return data

    async def send_input(self, batch_id: str, chunks: AsyncIterator[bytes], chunk: int) -> int:
        """Upload the input in pieces of at most `chunk` bytes; the bytes sent."""
        offset, pending = 0, bytearray()
        async for data in chunks:
            pending += data
            while len(pending) >= chunk:
                offset = await self._piece(batch_id, offset, bytes(pending[:chunk]))
                del pending[:chunk]
        if pending or offset == 0:
            offset = await self._piece(batch_id, offset, bytes(pending))
        return offset

    async def _piece(self, batch_id: str, offset: int, data: bytes) -> int:
        headers = [("content-type", "application/octet-stream"), ("x-saia-offset", str(offset))]
        answer = await self.call("PUT", f"{batch_id}/input", data, headers)
        size = answer.get("size")
        if size != offset + len(data):
            raise AgentBatchError(f"the agent holds {size} bytes of the input, not {offset}")
        return offset + len(data)

    async def submit(self, batch_id: str, spec: dict[str, Any]) -> dict[str, Any]:
        return await self.call("POST", batch_id, json.dumps(spec).encode())

    async def status(self, batch_id: str) -> dict[str, Any]:
        return await self.call("GET", batch_id)

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        return await self.call("POST", f"{batch_id}/cancel")

    async def forget(self, batch_id: str) -> dict[str, Any]:
        return await self.call("DELETE", batch_id)

    @asynccontextmanager
    async def output(self, batch_id: str) -> AsyncIterator[AsyncIterator[bytes] | None]:
        """The output file's bytes as they arrive; None when the job wrote none."""
        path = f"{PREFIX}{batch_id}/output"
        try:
            opened = self._client.stream("", "GET", path, [], b"", first_byte_timeout=self._timeout)
            async with opened as response:
                if response.status == 404:
                    yield None
                    return
                if response.status != 200:
                    raise AgentBatchError(f"the agent answered {response.status} for the output")
                yield response.aiter_bytes()
        except HopError as error:
            raise AgentBatchError(f"the output could not be fetched: {error}", 503) from None
