"""The multi-node job's Ray cluster wants a per-job token (issue 9 item 7).

The rendered `vllm-multinode` script run by bash with the stand-in `ray`, `srun`,
`scontrol` and `vllm` of tests/hpc/jobs/test_vllm_templates.py (no Ray or second node here):
with Ray 2.52+ every Ray process and vLLM get RAY_AUTH_MODE=token and the path of a 0600
token file, never the token; an older Ray is refused unless the operator accepts it.
"""

from __future__ import annotations

import stat
import time
from pathlib import Path

from tests.hpc.jobs.test_vllm_templates import (
    WAIT,
    RunningJob,
    fake_bin,
    job_runner,
    run_config,
)

__all__ = ["fake_bin", "job_runner"]  # fixtures, used by name


def multinode(tmp_path: Path, **environment: str) -> RunningJob:
    config = run_config(
        tmp_path, resources={"nodes": 2, "gpus": 1}, environment=environment, api_key=False
    )
    return RunningJob(config, tmp_path / "bin", tmp_path)


def wait_vllm(job: RunningJob) -> None:
    deadline = time.monotonic() + WAIT
    while not job.calls("vllm"):
        assert job.process.poll() is None, job.text()
        assert time.monotonic() < deadline, job.text()
        time.sleep(0.05)


def test_ray_runs_with_a_per_job_token_from_a_private_file(
    fake_bin: Path, tmp_path: Path, job_runner: list[RunningJob]
) -> None:
    job = multinode(tmp_path)
    job_runner.append(job)
    wait_vllm(job)
    token_file = job.job_dir / "ray_token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text()
    assert len(token) == 64 and int(token, 16) >= 0
    calls = job.calls("ray") + job.calls("srun") + job.calls("vllm")
    assert len(job.calls("ray")) == 3  # the head and a worker per other node (fake scontrol)
    for call in calls:
        assert call.env["RAY_AUTH_MODE"] == "token", call
        assert call.env["RAY_AUTH_TOKEN_PATH"] == str(token_file), call
        assert not any(token in arg for arg in call.argv)
    assert job.stop() == 0


def test_ray_without_token_authentication_is_refused(
    fake_bin: Path, tmp_path: Path, job_runner: list[RunningJob]
) -> None:
    job = multinode(tmp_path, FAKE_RAY_VERSION="2.51.2")
    job_runner.append(job)
    assert job.process.wait(timeout=WAIT) == 1
    assert "Ray 2.51.2 has no token authentication (needs 2.52+)" in job.text()
    assert job.calls("ray") == [] and job.calls("vllm") == []
    assert not (job.job_dir / "endpoint.json").exists()


def test_operator_can_accept_an_open_old_ray(
    fake_bin: Path, tmp_path: Path, job_runner: list[RunningJob]
) -> None:
    job = multinode(tmp_path, FAKE_RAY_VERSION="2.48.0", SAIA_RAY_ALLOW_NO_AUTH="1")
    job_runner.append(job)
    wait_vllm(job)
    assert "SAIA_RAY_ALLOW_NO_AUTH=1: starting it open" in job.text()
    assert all(call.env["RAY_AUTH_MODE"] is None for call in job.calls("ray"))
    assert job.stop() == 0
