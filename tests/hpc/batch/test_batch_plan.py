"""The pure parts of batch jobs: the plan (time, deadline, account, QOS, nice), the state
from Slurm, the exit code and the files (and when a new job carries on), and the rendered
job script."""

from __future__ import annotations

import re
import shlex
import subprocess
from dataclasses import replace
from pathlib import Path

from hpc.batch.plan import Observed, batch_state, plan_job
from hpc.batch.script import render_batch
from hpc.config import parse_config
from hpc.jobs.system import JobTag
from saia.base.durations import format_slurm_time

NOW = 1_800_000_000.0


def test_time_grows_with_the_input_within_bounds(tmp_path: Path) -> None:
    agent = parse_config({"state_dir": str(tmp_path), "services": [
        {"name": "bulk", "model": "m", "resources": {"account": "svc"}}]})  # fmt: skip
    service, batch = agent.services[0], agent.batch
    small = plan_job(10, 86400, None, None, service, batch, NOW)
    large = plan_job(40_000, 86400, None, None, service, batch, NOW)
    huge = plan_job(10_000_000, 86400, None, None, service, batch, NOW)
    assert small.time_limit_s == 906  # (600 s load + 2 rounds * 2 s) * 1.5
    assert large.time_limit_s == 15900  # (600 + 5000 rounds * 2 s) * 1.5
    assert huge.time_limit_s == 86400  # batch.max_time
    short_window = plan_job(40_000, 3600, None, None, service, batch, NOW)
    assert short_window.time_limit_s == 3600 and short_window.deadline == NOW + 3600
    assert (small.account, small.qos, small.nice) == ("svc", None, 1000)


def test_account_and_qos_by_user_then_group(tmp_path: Path) -> None:
    accounts = {"user:ann": {"account": "ann-project"}, "group:physics": {"account": "phys",
                "qos": "bulk"}}  # fmt: skip
    agent = parse_config({"state_dir": str(tmp_path), "batch": {"accounts": accounts,
                          "qos": "low"}, "services": [{"name": "s", "model": "m"}]})  # fmt: skip
    service, batch = agent.services[0], agent.batch
    ann = plan_job(1, 3600, "ann", "physics", service, batch, NOW)
    bob = plan_job(1, 3600, "bob", "physics", service, batch, NOW)
    eve = plan_job(1, 3600, "eve", None, service, batch, NOW)
    assert (ann.account, ann.qos) == ("ann-project", "low")
    assert (bob.account, bob.qos) == ("phys", "bulk")
    assert (eve.account, eve.qos) == (None, "low")


BATCH = parse_config({"state_dir": "/s", "batch": {"load_time": 300, "max_attempts": 3},
                     "services": [{"name": "s", "model": "m"}]}).batch  # fmt: skip
# A job that ended (not listed, no exit code) with 40 of 100 answered, 1 job so far, a day left.
ENDED = Observed(None, None, False, answered=40, total=100, attempts=1, deadline=NOW + 86400)


def test_state_from_slurm_the_exit_code_and_the_files() -> None:
    def state(seen: Observed) -> str:
        return batch_state(seen, BATCH, NOW).state

    assert state(replace(ENDED, job_state="PENDING")) == "queued"
    assert state(replace(ENDED, job_state="RUNNING", cancel_asked=True)) == "running"
    assert state(replace(ENDED, exit_code=0)) == "completed"
    finished_first = replace(ENDED, job_state="COMPLETING", exit_code=0, cancel_asked=True)
    assert state(finished_first) == "completed"
    assert state(replace(ENDED, job_state="COMPLETING", exit_code=143)) == "running"  # not yet
    assert state(replace(ENDED, exit_code=143, cancel_asked=True)) == "cancelled"
    assert state(replace(ENDED, cancel_asked=True)) == "cancelled"
    assert state(replace(ENDED, exit_code=143, answered=100)) == "completed"  # all answered
    failed = batch_state(replace(ENDED, exit_code=1), BATCH, NOW)
    assert failed.state == "failed" and "status 1" in (failed.message or "")
    assert not failed.resubmit


def test_a_job_that_stopped_with_requests_left_is_resubmitted_within_bounds() -> None:
    for ended in (ENDED, replace(ENDED, exit_code=143), replace(ENDED, exit_code=3)):
        again = batch_state(ended, BATCH, NOW)  # time limit, preemption, node failure
        assert (again.state, again.resubmit) == ("queued", True), ended
        assert "60 requests left" in (again.message or "")
    last = batch_state(replace(ENDED, attempts=3), BATCH, NOW)
    assert (last.state, last.resubmit) == ("failed", False)
    assert "3 jobs ran" in (last.message or "") and "without a result" in (last.message or "")
    near = batch_state(replace(ENDED, deadline=NOW + 300), BATCH, NOW)  # load_time 300 s
    assert (near.state, near.resubmit) == ("running", False)  # the hub expires it at the end
    assert "too little time" in (near.message or "")
    late = batch_state(replace(ENDED, deadline=NOW - 1), BATCH, NOW)
    assert (late.state, late.resubmit) == ("failed", False)
    assert batch_state(replace(ENDED, deadline=NOW + 301), BATCH, NOW).resubmit


def test_job_script_asks_for_deadline_nice_time_and_account(tmp_path: Path) -> None:
    agent = parse_config({"state_dir": str(tmp_path), "batch": {"qos": "low"}, "services": [
        {"name": "bulk", "model": "/models/bulk", "template": "vllm",
         "server_command": ["/venv/bin/vllm", "serve"], "vllm": {"max_model_len": 2048},
         "resources": {"gpus": 1, "account": "svc", "partition": "gpu"}}]})  # fmt: skip
    service = agent.services[0]
    plan = plan_job(100, 86400, None, None, service, agent.batch, NOW)
    tag = JobTag("saia", "b123")
    job = render_batch("batch-abc", service, agent, tag, plan, tmp_path / "batches" / "batch-abc")
    assert (job.job_name, job.comment) == ("saia-batch-abc", "saia-agent:b123")
    options = re.findall(r"^#SBATCH (\S+)", job.script, re.M)
    assert "--nice=1000" in options and "--account=svc" in options and "--qos=low" in options
    assert "--gres=gpu:1" in options and "--partition=gpu" in options
    assert any(o.startswith("--deadline=20") for o in options)
    assert plan.time_limit_s == 939 and "--time=" + format_slurm_time(939) in options
    runner = re.search(r"^SAIA_BATCH_RUNNER=\((.*)\)$", job.script, re.M)
    assert runner is not None
    argv = shlex.split(runner.group(1))
    driver = str(tmp_path / "batches" / "batch-abc" / "saia_batch_driver.py")
    assert argv[1] == driver and argv[argv.index("--concurrency") + 1] == "64"
    server = argv[argv.index("--") + 1 :]
    assert server[:3] == ["/venv/bin/vllm", "serve", "/models/bulk"]
    assert server[server.index("--max-model-len") :][:2] == ["--max-model-len", "2048"]
    assert server[-2:] == ["--middleware", "saia_backend_auth.BackendKeyMiddleware"]
    assert "SAIA_BATCH_DRIVER_END" in job.script and "SAIA_AUTH_MODULE_END" in job.script
    assert subprocess.run(["bash", "-n"], input=job.script, text=True, check=False).returncode == 0
