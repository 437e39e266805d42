"""The agent's side of backend TLS at its seams: reading a job's published certificate
(`read_endpoint`) and probing a stand-in that serves TLS (`HealthMonitor`, a pinned
client per job) against the real stand-in server on 127.0.0.1."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from hpc.jobs.system import job_dir, private_dir, read_endpoint, write_atomic
from hpc.scheduler.health import TLS_REFUSED, HealthBook, HealthMonitor, ProbeTarget
from saia.sandbox.certs import Certificate, make_certificate
from tests.fixtures.standin import STANDIN_MODEL, StandinProcess

Factory = Callable[..., StandinProcess]


def publish(state_dir: Path, job_id: str, cert: Certificate, sha256: str) -> None:
    """What slurm/common.sh writes: the certificate, then endpoint.json (both 0600)."""
    folder = private_dir(job_dir(state_dir, job_id))
    private_dir(folder / "tls")
    write_atomic(folder / "tls" / "cert.pem", cert.pem)
    record = {"host": "127.0.0.1", "port": 8443, "scheme": "https", "tls_sha256": sha256}
    write_atomic(folder / "endpoint.json", json.dumps(record))


def test_the_published_certificate_is_read_only_with_its_fingerprint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    job, other = make_certificate(tmp_path / "a"), make_certificate(tmp_path / "b")
    publish(tmp_path, "1", job, job.sha256.upper())  # openssl prints it in capitals
    found = read_endpoint(tmp_path, "1")
    assert found is not None and found.certificate == job.pem
    assert found.url == "https://127.0.0.1:8443" and found.tls() is not None

    publish(tmp_path, "2", job, other.sha256)  # the file is not the one named
    caplog.set_level(logging.WARNING, logger="hpc.jobs.system")
    assert read_endpoint(tmp_path, "2") is None
    assert read_endpoint(tmp_path, "2") is None
    warnings = [r.getMessage() for r in caplog.records if "job 2:" in r.getMessage()]
    assert len(warnings) == 1 and "BEGIN CERTIFICATE" not in warnings[0]

    publish(tmp_path, "3", job, job.sha256)
    (job_dir(tmp_path, "3") / "tls" / "cert.pem").chmod(0o644)  # not only ours
    assert read_endpoint(tmp_path, "3") is None

    publish(tmp_path, "4", job, job.sha256)
    (job_dir(tmp_path, "4") / "tls" / "cert.pem").unlink()  # https, but no certificate:
    assert read_endpoint(tmp_path, "4") is None  # never a plain fallback

    folder = private_dir(job_dir(tmp_path, "5"))
    write_atomic(folder / "endpoint.json", '{"host": "h", "port": 1, "scheme": "ftp"}')
    assert read_endpoint(tmp_path, "5") is None
    write_atomic(folder / "endpoint.json", '{"host": "h", "port": 1}')  # an older job
    plain = read_endpoint(tmp_path, "5")
    assert plain is not None and plain.url == "http://h:1" and plain.tls() is None


async def test_probes_trust_the_jobs_certificate_alone_and_log_a_refusal_once(
    standin_factory: Factory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    job, other = make_certificate(tmp_path / "a"), make_certificate(tmp_path / "b")
    server = standin_factory(certificate=job)
    good = ProbeTarget("1", server.url, STANDIN_MODEL, certificate=job.pem)
    bad = ProbeTarget("2", server.url, STANDIN_MODEL, certificate=other.pem)
    book = HealthBook(threshold=2)
    for target in (good, bad):
        book.get(target.job_id)
    monitor = HealthMonitor(book, lambda: [good, bad], lambda: None, 0.05, 5.0, lambda: 1.0)
    caplog.set_level(logging.WARNING, logger="hpc.scheduler.health")
    async with httpx.AsyncClient(trust_env=False) as shared:  # would trust public CAs only
        for _ in range(3):
            await monitor.round(shared, [good, bad])
        assert book.serving("1") and not book.serving("2")
        assert book.get("2").detail.startswith(TLS_REFUSED)
        await monitor.pinned.keep_only(set())
    refused = [r.getMessage() for r in caplog.records if TLS_REFUSED in r.getMessage()]
    assert len(refused) == 1 and refused[0].startswith("job 2 at https://127.0.0.1:")
