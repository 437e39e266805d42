"""The router to a stand-in model server that serves TLS with its own certificate, as a
job does (backend_tls): requests go through, pinned to that certificate; a server showing
another certificate is a failed backend (no request reaches it, the client gets a clear
503 after the queue timeout), and a pinned backend is never tried over plain HTTP."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from hpc.config import RouterConfig, ServiceConfig
from hpc.registry import Backend, BackendRegistry
from hpc.router.forwarding import Forwarder, Rejection
from saia.base.http11 import HttpClient
from saia.base.protocol import RequestHead
from saia.sandbox.certs import make_certificate
from tests.fixtures.standin import STANDIN_MODEL, StandinProcess
from tests.hpc.router.test_router_waits import Sink

Factory = Callable[..., StandinProcess]
SERVICE = ServiceConfig(name=STANDIN_MODEL, model=STANDIN_MODEL)
HEAD = RequestHead(
    STANDIN_MODEL, "POST", "/v1/chat/completions", [("content-type", "application/json")]
)
CHAT = {"model": STANDIN_MODEL, "messages": [{"role": "user", "content": "over tls"}]}


async def ask(backend: Backend, queue_timeout: float = 30.0) -> Sink:
    registry = BackendRegistry()
    registry.publish(STANDIN_MODEL, [backend])
    config = RouterConfig.model_validate({"queue_timeout": queue_timeout})
    sink = Sink()
    async with HttpClient(connect_timeout=5.0) as http:
        await Forwarder(http, registry, config).forward(
            sink, SERVICE, HEAD, json.dumps(CHAT).encode()
        )
    return sink


async def test_the_router_serves_through_a_tls_stand_in_pinned_to_its_certificate(
    standin_factory: Factory, tmp_path: Path
) -> None:
    job = make_certificate(tmp_path / "job")
    server = standin_factory(api_key="k" * 64, certificate=job)
    assert server.url.startswith("https://")
    backend = Backend(STANDIN_MODEL, "7", server.url, api_key="k" * 64, certificate=job.pem)
    sink = await ask(backend)
    assert (sink.status, sink.finished) == (200, True)
    assert json.loads(sink.body)["choices"][0]["message"]["content"] == "echo: over tls"


async def test_a_server_with_another_certificate_is_a_failed_backend(
    standin_factory: Factory, tmp_path: Path
) -> None:
    """The job published one certificate; whatever listens on its port shows another (an
    impostor, or the job's file swapped): the router refuses it and never sends the key."""
    job, impostor = make_certificate(tmp_path / "job"), make_certificate(tmp_path / "other")
    server = standin_factory(api_key="k" * 64, certificate=impostor)
    backend = Backend(STANDIN_MODEL, "8", server.url, api_key="k" * 64, certificate=job.pem)
    with pytest.raises(Rejection) as refused:
        await ask(backend, queue_timeout=2.0)
    assert (refused.value.status, refused.value.code) == (503, "backend_unavailable")
    assert backend.failures >= 1 and backend.served == 0


async def test_a_pinned_backend_is_never_tried_over_plain_http(
    standin_factory: Factory, tmp_path: Path
) -> None:
    """A pinned backend whose URL says http (a bug or a tampered record) fails: the
    request is not sent in clear to the plain stand-in."""
    job = make_certificate(tmp_path / "job")
    server = standin_factory()
    assert server.url.startswith("http://")
    backend = Backend(STANDIN_MODEL, "9", server.url, certificate=job.pem)
    with pytest.raises(Rejection):
        await ask(backend, queue_timeout=2.0)
    assert backend.failures >= 1 and backend.served == 0
