"""The login-node agent: observe -> decide -> act, health probes and the router.

`run_agent()` waits for the leader lock (standby until then), restores or rebuilds its
state, then runs in one TaskGroup: the scheduler loop (`Agent.step`), the health prober,
a forwarder of the router's scale-from-zero wake-ups, and the router itself.

Operators talk to the leader through request files (`hpc/scheduler/operator_requests.py`, applied
by `hpc/scheduler/operations.py`): `saia hpc drain` and `saia hpc reload`; SIGHUP also reloads the
config file, SIGUSR1 only makes it look at the requests at once.

On SIGTERM/SIGINT the agent stops acting, writes its state and releases the lock, but
leaves its jobs running: a restarted (or standby) agent adopts them by their tag, so an
agent restart never interrupts serving. `drain_on_exit=True` cancels them instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import httpx

from hpc.config import AgentConfig, ServiceConfig
from hpc.jobs.system import JobInfo, JobSystem, JobTag, Submission, private_dir
from hpc.registry import Backend, BackendRegistry
from hpc.router.server import serve_requests
from hpc.scheduler.episode import Episode
from hpc.scheduler.handover import HANDOVER_GRACE, hand_over
from hpc.scheduler.health import HealthMonitor, ProbeTarget
from hpc.scheduler.job_pruning import JobFolderPruner
from hpc.scheduler.leader import LOCK_FILE, LeaderLock
from hpc.scheduler.live import LiveState
from hpc.scheduler.metrics_file import write_metrics
from hpc.scheduler.observation import observe, probe_targets
from hpc.scheduler.operations import handle_requests, operator_signals
from hpc.scheduler.operator_requests import RELOAD_SIGNAL, WAKE_SIGNAL
from hpc.scheduler.placement_probes import PlacementProbes, placed_submission
from hpc.scheduler.policy import (
    Backoff,
    Cancel,
    Decision,
    Drain,
    Snapshot,
    Submit,
    Warn,
    after_failure,
    decide,
)
from hpc.scheduler.start_estimates import StartEstimates, publish_waits
from hpc.scheduler.state import AgentState, JobRecord, agent_id, restore_state
from hpc.scheduler.status import AgentStatus, build_status, write_status

log = logging.getLogger(__name__)

Render = Callable[[ServiceConfig], Submission]
JobSystemFactory = Callable[[AgentConfig, JobTag], JobSystem]
IMMEDIATE_STEPS = 3  # re-decide at once after acting, but never spin
EXIT_DRAIN_WAIT = 60.0  # --drain-on-exit: how long to wait for cancelled jobs to end


class Agent:
    """The leader's scheduler: owns its `LiveState` (`live`), the job system and the wake-up.

    Only the agent's own loop changes `live` (through its methods); the prober writes the
    health book; the router reads the registry the agent publishes to.
    """

    def __init__(
        self,
        config: AgentConfig,
        jobs: JobSystem,
        registry: BackendRegistry,
        state: AgentState,
        render: Render,
        clock: Callable[[], float] = time.time,
        config_path: Path | None = None,
    ) -> None:
        self.jobs, self.registry, self.render, self.clock = jobs, registry, render, clock
        self.live = LiveState(config, state)
        self.config_path = config_path  # re-read on reload
        self._reload_wanted = False
        self._published: set[str] = set()
        # Logged once when they start and once when they end, not on every loop.
        self._slurm_outage = Episode(log, "Slurm answers again after %.0f s")
        self._write_outage = Episode(log, "the agent's state is written again after %.0f s")
        self._starts = StartEstimates()  # Slurm's estimates for pending jobs, logged once
        self._probes = PlacementProbes()  # and where a new job would start soonest
        self._wake = asyncio.Event()
        self._handed_over = False
        self.folders = JobFolderPruner(self.live, jobs, clock)  # <state_dir>/jobs/ bounded

    @property
    def config(self) -> AgentConfig:
        """The running config (a reload replaces it)."""
        return self.live.config

    # -- lifetime -------------------------------------------------------------------
    async def run(self, hand_over: Callable[[], None] | None = None) -> None:
        """Until cancelled: the scheduler loop, health probes, wake-ups and the router;
        then `hand_over()` at once while the router finishes its streams (HANDOVER_GRACE)."""
        limits = httpx.Limits(max_keepalive_connections=64, keepalive_expiry=30)
        async with (
            httpx.AsyncClient(limits=limits, trust_env=False) as client,
            asyncio.TaskGroup() as group,
        ):
            group.create_task(self.health_monitor().run(client), name="health")
            group.create_task(self._forward_wakeups(), name="wakeups")
            group.create_task(self.folders.run(), name="job-folders")
            grace = HANDOVER_GRACE if hand_over else 0.0
            group.create_task(serve_requests(lambda: self.config, self.registry, grace))
            try:
                await self._schedule_loop()
            finally:
                if hand_over is not None:
                    self._save(self.clock(), stopped=True)
                    self._handed_over = True  # the next agent writes the state from now on
                    hand_over()

    async def _schedule_loop(self) -> None:
        streak = 0
        while True:
            acted = await self.step()
            streak = streak + 1 if acted else 0
            if acted and streak <= IMMEDIATE_STEPS:
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.poll_interval):
                    await self._wake.wait()
            self._wake.clear()

    async def _forward_wakeups(self) -> None:
        while True:
            await self.registry.wakeup.wait()
            self.registry.wakeup.clear()
            self._wake.set()

    def wake(self, reload: bool = False) -> None:
        """Decide at once (a signal); with `reload`, re-read the config file first."""
        self._reload_wanted = self._reload_wanted or reload
        self._wake.set()

    async def shutdown(self, drain: bool) -> None:
        """Leave jobs to the next agent (or cancel them when asked), save everything."""
        if drain:
            for job_id, record in list(self.live.jobs.items()):
                if not record.cancelled:
                    await self._cancel(Cancel(record.service, job_id, "agent exit with drain"))
            await self._wait_gone(EXIT_DRAIN_WAIT)
        if not self._handed_over:
            self._save(self.clock(), stopped=True)

    async def _wait_gone(self, limit_s: float) -> None:
        """Wait (bounded) until the job system lists none of our jobs any more."""
        jobs: list[JobInfo] = []
        try:
            async with asyncio.timeout(limit_s):
                while jobs := await self.jobs.list_jobs():  # noqa: ASYNC110 (no event to await)
                    await asyncio.sleep(0.5)
        except TimeoutError:
            log.warning("jobs still stopping after %.0fs: %s", limit_s, [j.job_id for j in jobs])
        except Exception as error:  # the jobs were cancelled; only the confirmation failed
            log.warning("cannot confirm the jobs stopped: %s", error)

    # -- one loop: observe -> decide -> act -----------------------------------------
    async def step(self) -> bool:
        """One observation, decision and act; True when it submitted or cancelled."""
        now = self.clock()
        reload, self._reload_wanted = self._reload_wanted, False
        handle_requests(self.live, reload, self.config_path, now)  # also while Slurm is down
        try:
            async with asyncio.timeout(self.config.slurm_timeout + 5):
                infos = await self.jobs.list_jobs()
        except Exception as error:  # Slurm down or slow: keep serving, retry next loop
            self.live.slurm_failed(f"cannot list jobs: {error}")
            self._slurm_outage.failed(now, self.live.error)
            self._save(now)
            return False
        self._slurm_outage.ok(now)
        await self._starts.read(self.jobs, infos, self.config.slurm_timeout + 5, now)
        snapshot = self.observe(infos, now)
        interval, limit = self.config.placement_probe_interval, self.config.slurm_timeout + 5
        snapshot = await self._probes.update(snapshot, self.jobs, self.render, interval, limit, now)
        decision = decide(snapshot, now)
        acted = await self.act(decision, now)
        self.publish()
        publish_waits(self.registry, snapshot, now)
        self._save(now)
        return acted

    def observe(self, infos: list[JobInfo], now: float) -> Snapshot:
        """The policy's snapshot (hpc/scheduler/observation.py); updates the live state."""
        return observe(self.live, self.registry, infos, now, self._starts.last)

    async def act(self, decision: Decision, now: float) -> bool:
        self.live.start_decision(decision.backoff)
        acted, refused, kept = False, set[str](), set[str]()
        for action in decision.actions:
            if isinstance(action, Warn):
                self.live.warn(action)
            elif isinstance(action, Drain):
                self.live.start_draining(action.job_id, action.reason)
                log.info("draining job %s (%s): %s", action.job_id, action.service, action.reason)
            elif isinstance(action, Cancel) and action.job_id not in kept:
                acted = await self._cancel(action) or acted
            elif isinstance(action, Submit):
                if action.service not in refused and await self._submit(action, now):
                    acted = True
                else:  # one failure backs off; the service's other submissions wait too
                    refused.add(action.service)
                    kept |= {action.moves} if action.moves else set()  # it keeps its place
        return acted

    async def _cancel(self, cancel: Cancel) -> bool:
        self.live.set_cancelled(cancel.job_id, True)
        self.publish()  # out of rotation before Slurm signals it
        log.info("cancelling job %s (%s): %s", cancel.job_id, cancel.service, cancel.reason)
        try:
            async with asyncio.timeout(self.config.slurm_timeout + 5):
                await self.jobs.cancel(cancel.job_id)
        except Exception as error:  # retried next loop
            log.error("cannot cancel job %s: %s", cancel.job_id, error)
            self.live.set_cancelled(cancel.job_id, False)
            return False
        return True

    async def _submit(self, submit: Submit, now: float) -> bool:
        service = self.live.services[submit.service]
        try:
            submission = placed_submission(self.render, service, submit.placement)
            async with asyncio.timeout(self.config.slurm_timeout + 5):
                job_id = await self.jobs.submit(submission)
        except Exception as error:  # a failed submission backs off like a failed start
            backoff = after_failure(self.live.backoff.get(service.name, Backoff()), now, service)
            message = f"submission failed: {error}"
            self.live.submission_failed(service.name, message, backoff)
            log.error("%s: %s", service.name, message)
            return False
        record = JobRecord(service.name, now, replaces=submit.replaces, moved_from=submit.moves)
        self.live.submitted(job_id, record)
        where = f" in {submit.placement}" if submit.placement else ""
        log.info("submitted job %s (%s%s): %s", job_id, service.name, where, submit.reason)
        return True

    def publish(self) -> None:
        """Tell the router which backends serve (ready or draining) per service.

        Jobs of a service a reload removed stay published as draining until they end, so
        the router keeps counting the requests still in flight on them.
        """
        live = self.live
        names = set(live.services) | {r.service for r in live.jobs.values()}
        per_service: dict[str, list[Backend]] = {name: [] for name in names | self._published}
        starting = dict.fromkeys(per_service, 0)
        for job_id, record in live.jobs.items():
            if record.cancelled:
                continue
            configured = record.service in live.services
            endpoint = live.endpoints.get(job_id)
            if endpoint is None or (configured and not live.health.serving(job_id)):
                starting[record.service] += configured and record.ready_since is None
                continue
            load = live.health.get(job_id).load  # its own gauges: the router's slot cap
            backend = Backend(
                service=record.service,
                job_id=job_id,
                url=endpoint.url,
                api_key=live.key(job_id),
                certificate=endpoint.certificate,
                draining=record.draining or not configured,
                running=load.running if load else None,
                waiting=load.waiting if load else None,
            )
            per_service[record.service].append(backend)
        for name, backends in per_service.items():
            self.registry.publish(name, backends, starting=starting[name])
        self._published = names

    def status(self, now: float, stopped: bool = False) -> AgentStatus:
        """What `saia hpc status` shows (`hpc/scheduler/status.py`)."""
        problems = (self._write_outage.message, self.folders.error)  # status fits a full disk
        return build_status(self.live, self.registry, now, stopped, problems)

    def _save(self, now: float, stopped: bool = False) -> None:
        """State and status, each written atomically; a failure (full disk, quota) is
        logged once until writing works again, and shown in the status."""
        failure = ""
        try:
            self.live.save()
        except OSError as error:
            failure = f"cannot write the agent state: {error}"
        self._write_outage.message = failure  # what the status shows
        try:
            status = self.status(now, stopped)
            write_status(self.config.state_dir, status)
            write_metrics(self.config.metrics_textfile, status)  # for node_exporter, if set
        except OSError as error:
            failure = failure or f"cannot write the agent status: {error}"
        if failure:
            self._write_outage.failed(now, failure)
        else:
            self._write_outage.ok(now)

    # -- health ---------------------------------------------------------------------
    def health_monitor(self) -> HealthMonitor:
        """Probes (and load reads) of this agent's backends, feeding its health book."""
        return HealthMonitor(
            self.live.health,
            self.probe_targets,
            self._wake.set,
            self.config.health_interval,
            self.config.health_timeout,
            self.clock,
        )

    def probe_targets(self) -> list[ProbeTarget]:
        """Every job with an endpoint that is not cancelled, with its key and readiness."""
        return probe_targets(self.live)


def make_job_system(config: AgentConfig, tag: JobTag) -> JobSystem:
    if config.executor == "local":
        from hpc.jobs.local import LocalJobSystem

        return LocalJobSystem(config, tag)
    from hpc.jobs.slurm import SlurmJobSystem

    return SlurmJobSystem(config, tag)


def default_render(service: ServiceConfig, config: AgentConfig, tag: JobTag) -> Submission:
    from hpc.jobs.script import render_job

    return render_job(service, config, tag)


async def run_agent(
    config: AgentConfig,
    *,
    registry: BackendRegistry | None = None,
    drain_on_exit: bool = False,
    job_system: JobSystemFactory = make_job_system,
    render: Callable[[ServiceConfig, AgentConfig, JobTag], Submission] | None = None,
    standby_poll: float = 1.0,
    config_path: Path | None = None,
) -> None:
    """Lead (after standing by, if another agent leads) until cancelled.

    `config_path` is the file a reload (SIGHUP, `saia hpc reload`) re-reads.
    """
    private_dir(config.state_dir)  # keys, endpoints and the socket: ours alone
    async with LeaderLock(config.state_dir / LOCK_FILE, standby_poll) as lock:
        ident = agent_id(config.state_dir)
        tag = JobTag(config.job_prefix, ident)
        render_with = render or default_render
        jobs = job_system(config, tag)
        agent = Agent(
            config,
            jobs,
            registry or BackendRegistry(),
            restore_state(config.state_dir, ident),
            render=lambda service: render_with(service, agent.config, tag),
            config_path=config_path,
        )
        log.info("agent %s leads in %s (pid %d)", ident, config.state_dir, os.getpid())
        try:
            with operator_signals(config.state_dir, agent.wake):
                await agent.run(None if drain_on_exit else partial(hand_over, config, lock))
        finally:
            await agent.shutdown(drain_on_exit)
            await jobs.aclose()
            log.info("agent %s stopped; jobs left running: %s", ident, not drain_on_exit)


async def run_until_signal(
    config: AgentConfig, *, drain_on_exit: bool = False, config_path: Path | None = None
) -> None:
    """`saia hpc agent`: run until SIGTERM or SIGINT, then stop cleanly."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)
    for signum in (RELOAD_SIGNAL, WAKE_SIGNAL):  # a standby ignores them; the leader handles
        loop.add_signal_handler(signum, log.info, "standby: %s ignored", signum.name)
    try:
        await run_agent(config, drain_on_exit=drain_on_exit, config_path=config_path)
    except asyncio.CancelledError:
        log.info("stopped by signal")
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, RELOAD_SIGNAL, WAKE_SIGNAL):
            loop.remove_signal_handler(signum)
