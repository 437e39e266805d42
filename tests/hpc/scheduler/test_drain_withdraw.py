"""A drain whose replacement cannot start (issue 18): status says so after a minute, and
`saia hpc drain JOB --cancel` takes it back; the pending replacement is then cancelled."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from hpc.cli import hpc
from hpc.scheduler.operator_requests import DrainRequest, parse_request, write_drain
from hpc.scheduler.status import serving
from tests.hpc.scheduler.test_agent_loop import SERVICE, rig


async def test_a_pending_replacement_is_reported_and_the_drain_withdrawn(tmp_path: Path) -> None:
    r = rig(tmp_path)
    await r.step()
    [first] = r.slurm.live(SERVICE)
    await r.serve(first)
    write_drain(r.state_dir, DrainRequest(job_id=first))
    await r.step()
    [second] = [j for j in r.slurm.live(SERVICE) if j != first]  # stays PENDING: node full
    assert r.status().services[0].warnings == []
    await r.step(61)
    (warning,) = r.status().services[0].warnings
    assert warning.startswith(f"drain of job {first} waits for its replacement {second}, ")
    assert f"withdraw it with saia hpc drain {first} --cancel" in warning
    write_drain(r.state_dir, DrainRequest(job_id=first, withdraw=True))
    await r.step()
    assert r.slurm.cancelled == [second]  # surplus once unlinked: scaled down
    assert {j.job_id: serving(j) for j in r.status().jobs}[first] == "ready"
    assert r.ready() == [first] and r.status().services[0].warnings == []


def test_withdrawal_round_trips_and_the_cli_checks_it(tmp_path: Path) -> None:
    path = write_drain(tmp_path, DrainRequest(job_id="17", withdraw=True))
    assert parse_request(path.read_text()) == DrainRequest(job_id="17", withdraw=True)
    config = tmp_path / "agent.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\nservices: [{{name: m, model: m}}]\n")
    for args in (["17", "--now"], ["--service", "m"]):
        result = CliRunner().invoke(hpc, ["drain", "-c", str(config), "--cancel", *args])
        assert result.exit_code == 2
        assert result.output == "error: --cancel withdraws the drain of one JOB\n"
