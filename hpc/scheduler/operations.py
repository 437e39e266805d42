"""What the running agent does with operator requests: drains and config reloads.

Functions of the `Agent` (like `hpc/scheduler/observation.py`), called at the start of its observe
step. A drain request only marks jobs in the agent's state (`JobRecord.operator_drain`);
the pure policy decides the hand-over from there. A reload swaps in a new config when it
is valid and changes nothing that needs a restart; otherwise one log line says why and the
running config stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING

from hpc.config import AgentConfig, ConfigError, load_config
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

if TYPE_CHECKING:
    from hpc.scheduler.agent import Agent

log = logging.getLogger(__name__)

# A reload applies these; any other top-level key is fixed for the agent's lifetime (the
# job system, router, prober and job tag were built from it): changing it needs a restart.
RELOADABLE = frozenset({"services", "max_total_gpus"})


def handle_requests(agent: Agent) -> None:
    """Apply the pending request files, and a reload asked for by SIGHUP."""
    reload = agent.reload_wanted
    agent.reload_wanted = False
    for request in take_requests(agent.config.state_dir):
        if isinstance(request, ReloadRequest):
            reload = True
        else:
            mark_drain(agent, request)
    if reload:
        reload_config(agent)


def mark_drain(agent: Agent, request: DrainRequest) -> None:
    how = OPERATOR_NOW if request.now else OPERATOR_REPLACE
    if request.job_id is not None:
        record = agent.state.jobs.get(request.job_id)
        if record is None or record.cancelled:
            log.error("drain request: job %s is not one of the agent's jobs", request.job_id)
            return
        if record.draining:
            log.info("drain request: job %s is draining already", request.job_id)
            return
        record.operator_drain = how if record.operator_drain != OPERATOR_NOW else OPERATOR_NOW
        log.info("operator drain of job %s (%s, %s)", request.job_id, record.service, how)
        return
    service = agent.config.service(request.service or "")
    if service is None:
        log.error("drain request: no service %r is configured", request.service)
        return
    marked = []
    for job_id, record in agent.state.jobs.items():
        if record.service == service.name and not (record.cancelled or record.draining):
            record.operator_drain = how if record.operator_drain != OPERATOR_NOW else OPERATOR_NOW
            marked.append(job_id)
    log.info("operator drain of service %s (%s): jobs %s", service.name, how, marked)


def reload_config(agent: Agent) -> None:
    agent.reloaded_at = agent.clock()
    path = agent.config_path
    if path is None:
        agent.reload_error = "config reload asked for, but the agent has no config file"
        log.error("%s", agent.reload_error)
        return
    try:
        new = load_config(path)
        refused = fixed_changes(agent.config, new)
        if refused:
            keys = ", ".join(refused)
            raise ConfigError(f"{keys}: cannot change while the agent runs (restart it)")
    except ConfigError as error:
        problem = "; ".join(str(error).splitlines())
        agent.reload_error = f"config reload failed, the running config stays: {problem}"
        log.error("%s", agent.reload_error)
        return
    before = {s.name for s in agent.config.services}
    apply_config(agent, new)
    after = set(agent.services)
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


def apply_config(agent: Agent, config: AgentConfig) -> None:
    """From the next loop on: new services start, removed ones' jobs are retired, new
    min/max apply, and new job settings apply to the next job submitted."""
    agent.config = config
    agent.services = {service.name: service for service in config.services}
    agent.loads = {name: agent.loads.get(name, deque()) for name in agent.services}
    agent.reload_error = ""


@contextlib.contextmanager
def operator_signals(agent: Agent) -> Iterator[None]:
    """While leading: SIGHUP reloads the config, SIGUSR1 looks at the requests at once; the
    pid file tells `saia hpc reload|drain` whom to signal."""
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(RELOAD_SIGNAL, agent.wake, True)
    loop.add_signal_handler(WAKE_SIGNAL, agent.wake)
    try:
        write_pid(agent.config.state_dir)
        yield
    finally:
        remove_pid(agent.config.state_dir)
        for signum in (RELOAD_SIGNAL, WAKE_SIGNAL):  # not the default action: that kills
            loop.add_signal_handler(signum, log.info, "stopping: %s ignored", signum.name)
