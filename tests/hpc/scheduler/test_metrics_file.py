"""The agent's metrics text file for node_exporter's textfile collector (issue 15, part 5):
written by the agent's own loop (the in-memory job system of test_agent_loop) with the
status, parsed back with prometheus_client's parser."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from hpc.scheduler.backend_load import BackendLoad, LoadReading
from hpc.scheduler.metrics_file import SERVICE_GAUGES, render, write_metrics
from hpc.scheduler.status import AgentStatus
from tests.hpc.scheduler.test_agent_loop import SERVICE, rig, service, settings


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_the_agent_writes_its_metrics_with_every_status(tmp_path: Path) -> None:
    out = tmp_path / "textfile" / "saia_agent.prom"
    config = settings(tmp_path / "state", service(min_instances=1, max_instances=3))
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(config | {"metrics_textfile": str(out)}))
    r = rig(tmp_path, config_path=path)
    await r.step()
    [job] = r.slurm.live(SERVICE)
    await r.serve(job)
    r.agent.live.health.record_load(LoadReading(job, BackendLoad(3, 2)))
    r.registry.note_arrival(SERVICE, time.monotonic())
    await r.step()
    labels = (("model", SERVICE), ("service", SERVICE))
    got = samples(out.read_text())
    assert got[("saia_agent_up", ())] == 1
    assert got[("saia_agent_error", ())] == 0
    assert abs(got[("saia_agent_status_timestamp_seconds", ())] - r.status().written_at) < 1
    assert got[("saia_agent_instances_ready", labels)] == 1
    assert got[("saia_agent_backend_running", labels)] == 3
    assert got[("saia_agent_backend_waiting", labels)] == 2
    assert got[("saia_agent_load", labels)] == 5
    assert got[("saia_agent_max_instances", labels)] == 3
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # node_exporter reads it as another user
    assert [p.name for p in out.parent.iterdir()] == ["saia_agent.prom"]  # no temporary left


def test_a_stopped_agent_says_so_and_no_path_writes_nothing(tmp_path: Path) -> None:
    status = AgentStatus(agent_id="a", pid=1, written_at=5.0, poll_interval=5.0, stopped=True)
    got = samples(render(status).decode())
    assert got[("saia_agent_up", ())] == 0
    assert len(SERVICE_GAUGES) == len({name for name, _, _ in SERVICE_GAUGES})
    write_metrics(None, status)
    assert list(tmp_path.iterdir()) == []
