"""What the running agent does with operator requests: drains and config reloads.

Functions over the agent's `LiveState` (`hpc/scheduler/live.py`), called at the start of
its observe step; they change it only through its methods. A drain request only marks
jobs (`JobRecord.operator_drain`); the pure policy decides the hand-over from there. A
reload swaps in a new config when it is valid and changes nothing that needs a restart;
otherwise one log line says why and the running config stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

from hpc.config import AgentConfig, ConfigError, load_config
from hpc.scheduler.live import LiveState
from hpc.scheduler.operator_requests import (
    RELOAD_SIGNAL,
    WAKE_SIGNAL,
    DrainRequest,
    ReloadRequest,
    remove_pid,
    take_requests,
    write_pid,
)
from hpc.scheduler.policy import OPERATOR_NOW, OPERATOR_REPLACE

log = logging.getLogger(__name__)

# A reload applies these; any other top-level key is fixed for the agent's lifetime (the
# job system, router, prober and job tag were built from it): changing it needs a restart.
RELOADABLE = frozenset({"services", "max_total_gpus"})


def handle_requests(live: LiveState, reload: bool, config_path: Path | None, now: float) -> None:
    """Apply the pending request files; reload too when one asks or `reload` (SIGHUP) is set."""
    for request in take_requests(live.config.state_dir):
        if isinstance(request, ReloadRequest):
            reload = True
        else:
            mark_drain(live, request)
    if reload:
        reload_config(live, config_path, now)


def mark_drain(live: LiveState, request: DrainRequest) -> None:
    how = OPERATOR_NOW if request.now else OPERATOR_REPLACE
    if request.withdraw:
        withdraw_drain(live, request.job_id or "")
        return
    if request.job_id is not None:
        record = live.jobs.get(request.job_id)
        if record is None or record.cancelled:
            log.error("drain request: job %s is not one of the agent's jobs", request.job_id)
            return
        if record.draining:
            log.info("drain request: job %s is draining already", request.job_id)
            return
        live.operator_drain(request.job_id, how)
        log.info("operator drain of job %s (%s, %s)", request.job_id, record.service, how)
        return
    service = live.config.service(request.service or "")
    if service is None:
        log.error("drain request: no service %r is configured", request.service)
        return
    marked = [
        job_id
        for job_id, record in live.jobs.items()
        if record.service == service.name and not (record.cancelled or record.draining)
    ]
    for job_id in marked:
        live.operator_drain(job_id, how)
    log.info("operator drain of service %s (%s): jobs %s", service.name, how, marked)


def withdraw_drain(live: LiveState, job_id: str) -> None:
    """Take back a drain that has not started: the job serves on; a replacement that is
    not ready is left to the scaling rules (surplus: cancelled, as a scale-down)."""
    record = live.jobs.get(job_id)
    if record is None or not record.operator_drain:
        log.error("drain withdrawal: job %s has no drain requested", job_id)
    elif record.draining or record.cancelled:
        log.error("drain withdrawal: job %s is draining already", job_id)
    else:
        freed = live.withdraw_drain(job_id)
        log.info("operator drain of job %s withdrawn; replacement(s) %s unlinked", job_id, freed)


def reload_config(live: LiveState, path: Path | None, now: float) -> None:
    if path is None:
        live.reload_failed(now, "config reload asked for, but the agent has no config file")
        log.error("%s", live.reload_error)
        return
    try:
        new = load_config(path)
        refused = fixed_changes(live.config, new)
        if refused:
            keys = ", ".join(refused)
            raise ConfigError(f"{keys}: cannot change while the agent runs (restart it)")
    except ConfigError as error:
        problem = "; ".join(str(error).splitlines())
        live.reload_failed(now, f"config reload failed, the running config stays: {problem}")
        log.error("%s", live.reload_error)
        return
    before = set(live.services)
    live.reloaded(now, new)
    after = set(live.services)
    log.info(
        "config reloaded from %s: services %s (added %s, removed %s)",
        path,
        sorted(after),
        sorted(after - before),
        sorted(before - after),
    )


def fixed_changes(old: AgentConfig, new: AgentConfig) -> list[str]:
    """Top-level keys a reload may not change that the new config changes."""
    before, after = old.model_dump(), new.model_dump()
    return sorted(k for k in before.keys() - RELOADABLE if before[k] != after.get(k))


@contextlib.contextmanager
def operator_signals(state_dir: Path, wake: Callable[[bool], None]) -> Iterator[None]:
    """While leading: SIGHUP reloads the config (`wake(True)`), SIGUSR1 looks at the
    requests at once (`wake(False)`); the pid file tells `saia hpc reload|drain` whom to
    signal."""
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(RELOAD_SIGNAL, wake, True)
    loop.add_signal_handler(WAKE_SIGNAL, wake, False)
    try:
        write_pid(state_dir)
        yield
    finally:
        remove_pid(state_dir)
        for signum in (RELOAD_SIGNAL, WAKE_SIGNAL):  # not the default action: that kills
            loop.add_signal_handler(signum, log.info, "stopping: %s ignored", signum.name)
