"""What the agent does when Slurm preempts one of its jobs: fast tests of the loop.

Slurm's side is played by hand on the in-memory job system (`tests/hpc/fakes.py`): the
job's shell writes `<job dir>/stopping` when it gets its stop signal (slurm/common.sh), a
cancelled job ends, a requeued one goes back to PENDING under the same id. The same on the
real sandbox cluster, with real preemption under load: tests/faults/test_preemption.py.
"""

from __future__ import annotations

from pathlib import Path

from hpc.jobs.system import job_dir
from hpc.scheduler.observation import STOPPING_FILE
from tests.hpc.scheduler.test_agent_loop import SERVICE, Rig, rig, service


def stop_signal(r: Rig, job_id: str) -> None:
    """What slurm/common.sh's saia_stop writes first when Slurm signals the job."""
    (job_dir(r.state_dir, job_id) / STOPPING_FILE).write_text("SIGTERM 0\n")


async def serving_job(r: Rig) -> str:
    await r.step()
    [job] = r.slurm.live(SERVICE)
    await r.serve(job)
    assert r.ready() == [job]
    return job


async def test_a_job_slurm_stops_drains_and_is_replaced_at_once(tmp_path: Path) -> None:
    """Preemption's SIGTERM: out of rotation and a replacement submitted at the next look,
    not after failed health checks or the job's end; cancelled once its requests are done."""
    r = rig(tmp_path)
    job = await serving_job(r)
    [backend] = r.registry.ready(SERVICE)
    backend.in_flight = 1  # a request still runs on it (the router counts it)
    stop_signal(r, job)
    assert await r.step() is True
    assert r.jobs()[job].draining and r.ready() == [] and backend.draining
    assert "preempted" in r.jobs()[job].drain_reason
    [new] = [j for j in r.slurm.live(SERVICE) if j != job]
    assert r.slurm.cancelled == [], "cancelled with a request in flight"
    backend.in_flight = 0
    await r.step()
    assert r.slurm.cancelled == [job]
    await r.serve(new)
    assert r.ready() == [new] and r.agent.live.backoff[SERVICE].failures == 0


async def test_a_job_preempted_while_loading_is_no_failed_start(tmp_path: Path) -> None:
    """A job Slurm stopped before it served did not fail to start: no back-off, the
    replacement goes in at once (startup_backoff is 30 s here)."""
    r = rig(tmp_path)
    await r.step()
    [job] = r.slurm.live(SERVICE)
    r.slurm.start(job, r.state_dir)  # running, loading: not ready yet
    await r.step()
    stop_signal(r, job)
    r.slurm.end(job)  # preempted: SIGTERM, then gone
    assert await r.step() is True
    assert r.agent.live.backoff[SERVICE].failures == 0
    assert len(r.slurm.live(SERVICE)) == 1 and r.slurm.live(SERVICE) != [job]


async def test_a_job_that_died_while_loading_still_backs_off(tmp_path: Path) -> None:
    """Without a stop signal a job that ended before it served is a failed start."""
    r = rig(tmp_path)
    await r.step()
    [job] = r.slurm.live(SERVICE)
    r.slurm.start(job, r.state_dir)
    await r.step()
    r.slurm.end(job)
    assert await r.step() is False
    assert r.agent.live.backoff[SERVICE].failures == 1 and r.slurm.live(SERVICE) == []


async def test_a_requeued_job_is_cancelled_and_replaced_at_once(tmp_path: Path) -> None:
    """PreemptMode=REQUEUE puts the job back to PENDING under the same id, held for minutes
    (Reason=BeginTime): the agent cancels it and submits a fresh job in the same loop."""
    r = rig(tmp_path, service(min_instances=2, max_instances=2))
    await r.step()
    first, second = r.slurm.live(SERVICE)
    await r.serve(first)
    await r.serve(second)
    stop_signal(r, second)
    fake = r.slurm.jobs[second]
    fake.state, fake.started_at, fake.reason = "PENDING", None, "BeginTime"
    assert await r.step() is True
    assert r.slurm.cancelled == [second]
    [new] = [j for j in r.slurm.live(SERVICE) if j not in (first, second)]
    assert r.ready() == [first]
    await r.step()
    assert second not in r.jobs() and r.agent.live.backoff[SERVICE].failures == 0
    await r.serve(new)
    assert r.ready() == sorted([first, new])
