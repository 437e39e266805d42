"""The leader's live state, and the one place that changes it.

`LiveState` holds what the agent knows between two loops: the saved `AgentState` (job
records and back-off, `hpc/scheduler/state.py`), the running config, the health book, each
job's endpoint and backend key, Slurm's last job list, each service's load history, this
loop's warnings and the errors shown in status.

Other modules read it through read-only views (`Mapping`, `Sequence`, frozen records), so
mypy rejects a write from outside; every change is a method here. The agent's loop calls
them: observation (`observation.py`), operator requests (`operations.py`) and acting
(`agent.py`); `status.py` only reads. The health book is the one shared part: the prober
writes probe results into it, this class only seeds and forgets its entries.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import replace

from hpc.config import AgentConfig, ServiceConfig
from hpc.jobs.system import JobInfo, Rendezvous
from hpc.scheduler.health import HealthBook
from hpc.scheduler.policy import OPERATOR_NOW, Backoff, LoadSample, LostJob, Warn
from hpc.scheduler.state import AgentState, JobRecord, save_state

log = logging.getLogger(__name__)


class LiveState:
    """Everything the leader knows between loops; only its own methods change it."""

    def __init__(self, config: AgentConfig, saved: AgentState) -> None:
        self._config = config
        self._services = {service.name: service for service in config.services}
        self._saved = saved
        self._health = HealthBook(config.health_failures)
        self._endpoints: dict[str, Rendezvous] = {}
        self._keys: dict[str, str | None] = {}
        self._infos: dict[str, JobInfo] = {}
        # Seeded from the saved samples: a restart keeps the scaling window (and so the
        # scale_down_delay already served) instead of starting from no load.
        self._loads = {name: deque(saved.loads.get(name, ())) for name in self._services}
        self._warnings: dict[str, list[str]] = {}
        self._logged: set[tuple[str, str | None, str]] = set()
        self._slurm_error = ""
        self._reload_error = ""
        self._reloaded_at: float | None = None
        for job_id, record in saved.jobs.items():
            self._health.seed(job_id, record.ready_since)

    # -- reading --------------------------------------------------------------------
    @property
    def config(self) -> AgentConfig:
        return self._config

    @property
    def services(self) -> Mapping[str, ServiceConfig]:
        """The configured services by name (changes only with a reload)."""
        return self._services

    @property
    def agent_id(self) -> str:
        return self._saved.agent_id

    @property
    def jobs(self) -> Mapping[str, JobRecord]:
        """Our jobs as Slurm last listed them (plus those submitted since)."""
        return self._saved.jobs

    @property
    def backoff(self) -> Mapping[str, Backoff]:
        return self._saved.backoff

    @property
    def health(self) -> HealthBook:
        return self._health

    @property
    def endpoints(self) -> Mapping[str, Rendezvous]:
        return self._endpoints

    def key(self, job_id: str) -> str | None:
        """The job's backend API key, if it has one."""
        return self._keys.get(job_id)

    def info(self, job_id: str) -> JobInfo | None:
        """What Slurm last said about the job."""
        return self._infos.get(job_id)

    def loads(self, service: str) -> Sequence[LoadSample]:
        return self._loads.get(service, ())

    def warnings(self, service: str) -> Sequence[str]:
        """This loop's warnings of the service (the policy's and failed submissions)."""
        return self._warnings.get(service, ())

    @property
    def error(self) -> str:
        """The problem status shows first: Slurm unreachable, else a failed reload."""
        return self._slurm_error or self._reload_error

    @property
    def reload_error(self) -> str:
        return self._reload_error

    @property
    def reloaded_at(self) -> float | None:
        return self._reloaded_at

    def save(self) -> None:
        """Write the saved part to `<state_dir>/agent-state.json`; OSError if it cannot."""
        self._saved.loads = {name: list(samples) for name, samples in self._loads.items()}
        save_state(self._config.state_dir, self._saved)

    # -- observation ----------------------------------------------------------------
    def slurm_failed(self, message: str) -> None:
        self._slurm_error = message

    def take_job_list(self, infos: Sequence[JobInfo], now: float) -> dict[str, list[LostJob]]:
        """Slurm's job list: forget the jobs it no longer lists (returned per service),
        adopt the ones we do not know, note starts and readiness."""
        self._slurm_error = ""
        self._infos = {info.job_id: info for info in infos}
        lost = self._drop_lost()
        for info in infos:
            self._track(info, now)
        return lost

    def _drop_lost(self) -> dict[str, list[LostJob]]:
        jobs, lost = self._saved.jobs, dict[str, list[LostJob]]()
        for job_id in [j for j in jobs if j not in self._infos]:
            record = jobs.pop(job_id)
            was_ready = record.ready_since is not None
            lost.setdefault(record.service, []).append(
                LostJob(job_id, was_ready=was_ready, cancelled=record.cancelled)
            )
            self._health.forget(job_id)
            self._endpoints.pop(job_id, None)
            self._keys.pop(job_id, None)
            # a new problem of the same kind with this job id is logged again
            self._logged = {key for key in self._logged if key[1] != job_id}
            log.info("job %s (%s) is gone from Slurm", job_id, record.service)
        for job_id, record in jobs.items():
            if record.replaces is not None and record.replaces not in jobs:
                jobs[job_id] = replace(record, replaces=None)
        return lost

    def _track(self, info: JobInfo, now: float) -> None:
        record = self._saved.jobs.get(info.job_id)
        if record is None:
            record = JobRecord(info.service, info.submit_time or now)
            log.info("adopted job %s (%s, %s)", info.job_id, info.service, info.state)
        if info.running and record.running_since is None:
            record = replace(record, running_since=min(info.start_time or now, now))
        ready_since = self._health.get(info.job_id).ready_since
        if record.ready_since is None and ready_since is not None:
            record = replace(record, ready_since=ready_since)
        self._saved.jobs[info.job_id] = record

    def found_endpoint(self, job_id: str, endpoint: Rendezvous, key: str | None) -> None:
        """The job wrote its endpoint.json (and perhaps its api_key)."""
        if job_id in self._saved.jobs:
            self._endpoints[job_id], self._keys[job_id] = endpoint, key

    def add_load_sample(self, service: ServiceConfig, sample: LoadSample) -> None:
        """Keep the samples the scaling policy looks at (look_back + scale_down_delay)."""
        history = self._loads.setdefault(service.name, deque())
        history.append(sample)
        window = service.look_back + service.scale_down_delay
        while history and history[0].at < sample.at - window:
            history.popleft()

    # -- acting ---------------------------------------------------------------------
    def start_decision(self, backoff: Mapping[str, Backoff]) -> None:
        """A new decision: its back-off replaces the services', its warnings the old ones."""
        self._saved.backoff.update(backoff)
        self._warnings = {}

    def warn(self, warn: Warn) -> None:
        message = f"job {warn.job_id}: {warn.message}" if warn.job_id else warn.message
        self._warnings.setdefault(warn.service, []).append(message)
        key = (warn.service, warn.job_id, re.sub(r"[0-9]+", "N", warn.message))
        if key not in self._logged:  # once per kind of problem, not once per loop
            self._logged.add(key)
            log.warning("%s: %s", warn.service, message)

    def submission_failed(self, service: str, message: str, backoff: Backoff) -> None:
        self._saved.backoff[service] = backoff
        self._warnings.setdefault(service, []).append(message)

    def submitted(self, job_id: str, record: JobRecord) -> None:
        self._saved.jobs[job_id] = record

    def start_draining(self, job_id: str, reason: str) -> None:
        if (record := self._saved.jobs.get(job_id)) is not None:
            self._saved.jobs[job_id] = replace(record, draining=True, drain_reason=reason)

    def set_cancelled(self, job_id: str, cancelled: bool) -> None:
        """Out of rotation once cancelled; back in when the cancel failed (retried)."""
        if (record := self._saved.jobs.get(job_id)) is not None:
            self._saved.jobs[job_id] = replace(record, cancelled=cancelled)

    # -- operator requests ----------------------------------------------------------
    def operator_drain(self, job_id: str, how: str) -> None:
        """Mark a job for an operator drain; "now" is never weakened to "replace"."""
        record = self._saved.jobs.get(job_id)
        if record is not None and record.operator_drain != OPERATOR_NOW:
            self._saved.jobs[job_id] = replace(record, operator_drain=how)

    def withdraw_drain(self, job_id: str) -> list[str]:
        """Clear a job's operator drain; its replacements not ready yet become ordinary
        jobs (the scaling rules keep or cancel them). Returns their ids."""
        jobs = self._saved.jobs
        jobs[job_id] = replace(jobs[job_id], operator_drain="")
        freed = [i for i, r in jobs.items() if r.replaces == job_id and r.ready_since is None]
        for successor in freed:
            jobs[successor] = replace(jobs[successor], replaces=None)
        return freed

    def reload_failed(self, at: float, message: str) -> None:
        self._reloaded_at, self._reload_error = at, message

    def reloaded(self, at: float, config: AgentConfig) -> None:
        """From the next loop on: new services start, removed ones' jobs are retired, new
        min/max apply, and new job settings apply to the next job submitted."""
        self._reloaded_at, self._reload_error = at, ""
        self._config = config
        self._services = {service.name: service for service in config.services}
        self._loads = {name: self._loads.get(name, deque()) for name in self._services}
