"""The HTTP/1.1 client with a per-request TLS context pinned to one certificate (the
router to a model-server job): the right certificate is accepted and its connection
reused, any other is refused before a byte of the request is sent, connections made under
one pin never serve another, and a pinned request never goes out as plain HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from saia.base.http11 import ConnectFailed, HttpClient
from saia.base.pinned_tls import fingerprint, pinned_context
from saia.sandbox.certs import Certificate, make_certificate

OK = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok"


@dataclass
class Seen:
    """What a test server received: connections and the raw bytes of each."""

    accepted: int = 0
    received: list[bytes] = field(default_factory=list)


@asynccontextmanager
async def server(tls: ssl.SSLContext | None) -> AsyncIterator[tuple[str, Seen]]:
    """Answers `ok` to every request on a connection; records what arrived."""
    seen = Seen()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.accepted += 1
        data = b""
        try:
            while chunk := await reader.read(65536):
                data += chunk
                if data.endswith(b"\r\n\r\n"):
                    writer.write(OK)
                    await writer.drain()
        except (OSError, ssl.SSLError, asyncio.CancelledError):
            pass  # the client went away, or the test ended: the connection is over
        finally:
            seen.received.append(data)
            writer.close()

    listener = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=tls)
    port = listener.sockets[0].getsockname()[1]
    async with listener:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}", seen
        listener.close()


def serving_context(cert: Certificate) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert.cert_file, cert.key_file)
    return context


async def get(client: HttpClient, url: str, tls: ssl.SSLContext | None) -> bytes:
    async with client.stream("GET", f"{url}/health", [], b"", 10, tls=tls) as response:
        assert response.status == 200
        return b"".join([chunk async for chunk in response.chunks(10)])


@pytest.fixture
def certs(tmp_path: Path) -> tuple[Certificate, Certificate]:
    return make_certificate(tmp_path / "job"), make_certificate(tmp_path / "impostor")


async def test_the_pinned_certificate_is_accepted_and_its_connection_reused(
    certs: tuple[Certificate, Certificate],
) -> None:
    job, _ = certs
    async with server(serving_context(job)) as (url, seen), HttpClient() as client:
        pin = pinned_context(job.pem)
        assert await get(client, url, pin) == b"ok"
        assert await get(client, url, pin) == b"ok"
    assert seen.accepted == 1
    assert pinned_context(job.pem) is pin  # one context per job: a stable pool key


async def test_another_certificate_is_refused_before_the_request_is_sent(
    certs: tuple[Certificate, Certificate],
) -> None:
    job, impostor = certs
    async with server(serving_context(impostor)) as (url, seen), HttpClient() as client:
        with pytest.raises(ConnectFailed, match="not the one pinned for it"):
            await get(client, url, pinned_context(job.pem))
        await asyncio.sleep(0)  # let the server's handler record what it got
    assert not any(b"GET /health" in data for data in seen.received)


async def test_connections_are_pooled_per_pin_not_per_origin(
    certs: tuple[Certificate, Certificate],
) -> None:
    """An idle connection to the same host and port, made under the job's pin, must not
    carry a request pinned to another certificate (a new job on the same port)."""
    job, impostor = certs
    async with server(serving_context(job)) as (url, seen), HttpClient() as client:
        assert await get(client, url, pinned_context(job.pem)) == b"ok"
        assert client.idle_connections == 1
        with pytest.raises(ConnectFailed, match="not the one pinned for it"):
            await get(client, url, pinned_context(impostor.pem))
        assert client.idle_connections == 1  # the job's connection was left alone
        assert await get(client, url, pinned_context(job.pem)) == b"ok"
    assert seen.accepted == 1


async def test_a_pinned_request_never_goes_out_as_plain_http(
    certs: tuple[Certificate, Certificate],
) -> None:
    job, _ = certs
    async with server(None) as (plain_url, seen), HttpClient() as client:
        with pytest.raises(ConnectFailed, match="needs an https URL"):
            await get(client, plain_url, pinned_context(job.pem))
        assert seen.accepted == 0
        # An https URL whose server speaks plain HTTP: the handshake fails, nothing in clear.
        https_url = plain_url.replace("http://", "https://")
        with pytest.raises(ConnectFailed):
            await get(client, https_url, pinned_context(job.pem))
        await asyncio.sleep(0)
    assert not any(b"GET /health" in data for data in seen.received)


def test_fingerprint_is_the_sha256_of_the_der_certificate(
    certs: tuple[Certificate, Certificate],
) -> None:
    job, impostor = certs
    der = ssl.PEM_cert_to_DER_cert(job.pem)
    assert fingerprint(job.pem) == hashlib.sha256(der).hexdigest() != fingerprint(impostor.pem)
    with pytest.raises(ValueError):
        fingerprint("not a certificate")
