"""The HTTP/1.1 client's pool when backends come and go (the router's jobs, each its own
origin and TLS pin): idle connections to an origin nobody asks for again are closed once
expired or closed by the server, not kept (with their file descriptors) forever."""

from __future__ import annotations

import asyncio

from saia.base.http11 import HttpClient
from tests.hpc.helpers import until
from tests.saia.test_http11 import answer, get, read_request, serving


async def keep_answering(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        await read_request(reader)
        writer.write(answer(b'{"n": 1}'))
        await writer.drain()


async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.write(answer(b'{"n": 1}'))  # keep-alive, then closed: the job ended
    await writer.drain()


async def test_expired_idle_connections_of_a_gone_origin_are_closed() -> None:
    async with (
        serving(keep_answering) as old,
        serving(keep_answering) as new,
        HttpClient(keepalive_expiry=0.0) as client,
    ):
        await asyncio.gather(*(get(client, f"{old.url}/x") for _ in range(3)))
        assert old.accepted == 3
        assert await get(client, f"{new.url}/x") == (200, b'{"n": 1}')
        # the old origin is never asked again: its expired connections are closed anyway
        await until(lambda: old.open == 0, 10, "the old origin's connections closed")
        assert client.idle_connections == 1  # the new origin's


async def test_idle_connections_the_server_closed_are_dropped() -> None:
    async with (
        serving(answer_once) as old,
        serving(keep_answering) as new,
        HttpClient(keepalive_expiry=30.0) as client,
    ):
        await asyncio.gather(*(get(client, f"{old.url}/x") for _ in range(3)))
        await until(lambda: old.open == 0, 10, "the old server closed its connections")

        async def swept() -> bool:
            await get(client, f"{new.url}/x")
            return client.idle_connections == 1

        for _ in range(50):  # bounded: until the client has read the old server's EOFs
            if await swept():
                break
            await asyncio.sleep(0.1)
        assert client.idle_connections == 1
