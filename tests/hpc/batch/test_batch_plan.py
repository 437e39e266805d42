"""The pure parts of batch jobs: the plan (time, deadline, account, QOS, nice), the state
from Slurm and the exit code, the progress line, and the rendered job script."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

from hpc.batch.plan import batch_state, plan_job, progress
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


def test_state_from_slurm_and_the_exit_code() -> None:
    assert batch_state("PENDING", None, False).state == "queued"
    assert batch_state("RUNNING", None, True).state == "running"
    assert batch_state(None, 0, False).state == "completed"
    assert batch_state("COMPLETING", 0, True).state == "completed"  # it finished first
    assert batch_state(None, 143, True).state == "cancelled"
    failed = batch_state(None, 1, False)
    assert failed.state == "failed" and "status 1" in (failed.message or "")
    assert batch_state(None, None, True).state == "cancelled"
    gone = batch_state(None, None, False)
    assert gone.state == "failed" and "without a result" in (gone.message or "")


def test_progress_from_the_runner_line() -> None:
    log = b"INFO\nRunning batch:  40% Completed | 8/20 [00:05<00:07]\n"
    log += b"Running batch:  45% Completed | 9/20\n"
    assert progress(log, 0) == 9
    assert progress(b"no progress yet", 3) == 3


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
    assert argv[:4] == ["/venv/bin/vllm", "run-batch", "--model", "/models/bulk"]
    assert argv[argv.index("--max-model-len") :][:2] == ["--max-model-len", "2048"]
    assert subprocess.run(["bash", "-n"], input=job.script, text=True, check=False).returncode == 0
