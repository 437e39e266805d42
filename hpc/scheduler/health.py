"""Backend probes over HTTP and the per-job health book they feed.

Readiness = `GET /health` answers 200 AND `GET /v1/models` lists the service's model id.
Once ready, a job gets `GET /health` only; `health_failures` failures in a row take it out
of rotation (the policy cancels and replaces it). All probes of a round run concurrently
on the agent's one keep-alive `httpx.AsyncClient`, each bounded by `health_timeout`.
Each round also reads every ready job's own load figures from its `GET /metrics`
(`hpc/scheduler/backend_load.py`); a failed read leaves the figures unknown and is no
health failure. A job that serves TLS is probed on a client of its own that trusts its
certificate alone (`PinnedClients`; httpx verifies per client, not per request): a server
showing another certificate fails its probes before the job's key is sent, and is logged
once with the job id.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from hpc.jobs.system import job_dir, read_private
from hpc.scheduler.backend_load import BackendLoad, LoadReading, read_load
from saia.base.pinned_tls import pinned_context

log = logging.getLogger(__name__)
API_KEY_FILE = "api_key"
TLS_REFUSED = "TLS: the server's certificate is not the one the job published"


@dataclass(frozen=True)
class ProbeTarget:
    job_id: str
    url: str
    model_id: str
    api_key: str | None = None
    ready: bool = False  # already ready: liveness (/health) only
    certificate: str | None = None  # the job's own (PEM): the only one its probes trust


@dataclass(frozen=True)
class ProbeResult:
    job_id: str
    ok: bool
    detail: str = ""


def read_backend_key(state_dir: Path, job_id: str) -> str | None:
    """The job's backend API key (`<job dir>/api_key`, written by the job), if any: only
    from a file that is ours and 0600 (`read_private`)."""
    text = read_private(job_dir(state_dir, job_id) / API_KEY_FILE)
    return (text or "").strip() or None


def _listed(body: object, model_id: str) -> bool:
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        return False
    return any(isinstance(m, dict) and m.get("id") == model_id for m in body["data"])


async def _check(client: httpx.AsyncClient, target: ProbeTarget) -> str:
    """Empty string when healthy (and, before ready, serving the model), else why not."""
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    response = await client.get(f"{target.url}/health", headers=headers)
    if response.status_code != 200:
        return f"/health answered {response.status_code}"
    if target.ready:
        return ""
    response = await client.get(f"{target.url}/v1/models", headers=headers)
    if response.status_code != 200:
        return f"/v1/models answered {response.status_code}"
    try:
        body = response.json()
    except ValueError:
        return "/v1/models answered no JSON"
    return "" if _listed(body, target.model_id) else f"/v1/models lacks {target.model_id!r}"


async def probe(client: httpx.AsyncClient, target: ProbeTarget, limit_s: float) -> ProbeResult:
    try:
        async with asyncio.timeout(limit_s):
            problem = await _check(client, target)
    except TimeoutError:
        problem = f"no answer within {limit_s:g}s"
    except httpx.HTTPError as error:
        problem = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        if _certificate_refused(error):
            problem = f"{TLS_REFUSED} ({problem})"
    return ProbeResult(job_id=target.job_id, ok=not problem, detail=problem)


def _certificate_refused(error: BaseException) -> bool:
    """Whether the TLS handshake refused the server's certificate (httpx wraps the error)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class PinnedClients:
    """One keep-alive httpx client per job certificate, each trusting that certificate
    alone (never the system store); owned by the monitor, closed once the job is gone."""

    def __init__(self) -> None:
        self._clients: dict[str, httpx.AsyncClient] = {}

    def get(self, shared: httpx.AsyncClient, target: ProbeTarget) -> httpx.AsyncClient:
        """The client for `target`: `shared` for a plain backend."""
        pem = target.certificate
        if pem is None:
            return shared
        client = self._clients.get(pem)
        if client is None:
            limits = httpx.Limits(max_keepalive_connections=4, keepalive_expiry=30)
            client = httpx.AsyncClient(verify=pinned_context(pem), limits=limits, trust_env=False)
            self._clients[pem] = client
        return client

    async def keep_only(self, certificates: set[str]) -> None:
        for pem in [pem for pem in self._clients if pem not in certificates]:
            await self._clients.pop(pem).aclose()


async def probe_all(
    client: httpx.AsyncClient,
    targets: list[ProbeTarget],
    limit_s: float,
    pinned: PinnedClients | None = None,
) -> list[ProbeResult]:
    """Probe every target concurrently (a TLS job on its `pinned` client); returns one
    result per target, in order."""
    pinned = pinned or PinnedClients()
    async with asyncio.TaskGroup() as group:
        tasks = [
            group.create_task(probe(pinned.get(client, target), target, limit_s))
            for target in targets
        ]
    return [task.result() for task in tasks]


@dataclass
class HealthRecord:
    ready_since: float | None = None
    failures: int = 0  # consecutive failed checks since ready
    detail: str = ""
    load: BackendLoad | None = None  # from the last /metrics read; None: unknown
    load_problem: str = ""  # why the last /metrics read gave no figures


class HealthBook:
    """What the probes said about each job; `record` reports changes worth acting on."""

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self._records: dict[str, HealthRecord] = {}

    def get(self, job_id: str) -> HealthRecord:
        return self._records.setdefault(job_id, HealthRecord())

    def seed(self, job_id: str, ready_since: float | None) -> None:
        """Restore readiness known from the state file (an adopted job)."""
        self.get(job_id).ready_since = ready_since

    def forget(self, job_id: str) -> None:
        self._records.pop(job_id, None)

    def known(self) -> set[str]:
        return set(self._records)

    def record(self, result: ProbeResult, now: float) -> bool:
        """Apply one probe result; True when the job became ready or crossed the threshold.

        A result for a job forgotten while it was being probed is dropped.
        """
        record = self._records.get(result.job_id)
        if record is None:
            return False
        record.detail = result.detail
        if record.ready_since is None:
            if result.ok:
                record.ready_since, record.failures = now, 0
                return True
            return False
        if result.ok:
            record.failures = 0
            return False
        record.failures += 1
        return record.failures == self.threshold

    def record_load(self, reading: LoadReading) -> str | None:
        """Keep a job's latest load figures; returns the previous problem ("" if none).

        A reading for a job forgotten meanwhile is dropped (None). Health is left alone.
        """
        record = self._records.get(reading.job_id)
        if record is None:
            return None
        before = record.load_problem
        record.load, record.load_problem = reading.load, reading.problem
        return before

    def serving(self, job_id: str) -> bool:
        """Ready and not (yet) failing enough checks to be taken out of rotation."""
        record = self._records.get(job_id)
        return bool(record and record.ready_since is not None and record.failures < self.threshold)


class HealthMonitor:
    """Probes the backends `targets()` names every `interval`; calls `on_change` when a job
    becomes ready or crosses the failure threshold, so the scheduler acts at once."""

    def __init__(
        self,
        book: HealthBook,
        targets: Callable[[], list[ProbeTarget]],
        on_change: Callable[[], None],
        interval: float,
        limit_s: float,
        clock: Callable[[], float],
    ) -> None:
        self.book, self.targets, self.on_change = book, targets, on_change
        self.interval, self.limit_s, self.clock = interval, limit_s, clock
        self._announced: set[str] = set()
        self._tls_refused: set[str] = set()
        self.pinned = PinnedClients()

    async def run(self, client: httpx.AsyncClient) -> None:
        """Until cancelled."""
        try:
            while True:
                targets = self.targets()
                if targets:
                    await self.round(client, targets)
                await asyncio.sleep(self.interval)
        finally:
            await self.pinned.keep_only(set())

    async def round(self, client: httpx.AsyncClient, targets: list[ProbeTarget]) -> None:
        """Probe all targets and read the ready ones' load, all at once; record both."""
        await self.pinned.keep_only({t.certificate for t in targets if t.certificate})
        async with asyncio.TaskGroup() as group:
            probes = group.create_task(probe_all(client, targets, self.limit_s, self.pinned))
            reads = [
                group.create_task(
                    read_load(
                        self.pinned.get(client, t),
                        t.job_id,
                        t.url,
                        t.model_id,
                        t.api_key,
                        self.limit_s,
                    )
                )
                for t in targets
                if t.ready
            ]
        now, changed = self.clock(), False
        for target, result in zip(targets, probes.result(), strict=True):
            changed = self.book.record(result, now) or changed
            self._log(target, result)
        for read in reads:
            self._note_load(read.result())
        if changed:
            self.on_change()

    def _note_load(self, reading: LoadReading) -> None:
        before = self.book.record_load(reading)
        # Logged once per kind of problem, not once per round.
        if before is not None and reading.problem and reading.problem != before:
            log.info("job %s: no load figures (%s)", reading.job_id, reading.problem)

    def _log(self, target: ProbeTarget, result: ProbeResult) -> None:
        if result.detail.startswith(TLS_REFUSED) and target.job_id not in self._tls_refused:
            self._tls_refused.add(target.job_id)  # once: it fails every round until replaced
            log.warning("job %s at %s: %s", target.job_id, target.url, result.detail)
        record = self.book.get(target.job_id) if target.job_id in self.book.known() else None
        if record is None or record.ready_since is None:
            return  # still starting: the startup timeout speaks for it
        if result.ok and target.job_id not in self._announced:
            self._announced.add(target.job_id)
            log.info("job %s is ready at %s", target.job_id, target.url)
        elif not result.ok:
            log.warning(
                "job %s failed %d health check(s) in a row: %s",
                target.job_id,
                record.failures,
                result.detail,
            )
