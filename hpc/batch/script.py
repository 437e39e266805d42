"""Renders a batch job script (pure): `#SBATCH` lines, quoted values, `slurm/batch.sh`.

The job asks for the service's resources, with the plan's --time, --deadline, --nice,
account and QOS (`hpc.batch.plan`). It runs `slurm/saia_batch_driver.py` (carried in the
script as a here-document), which starts the service's server (`vllm serve` with the
service's vLLM options, or the stand-in for `standin`) and sends it the batch's requests.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

from hpc.batch.plan import JobPlan
from hpc.config import AgentConfig, ServiceConfig
from hpc.jobs.script import JobScriptError, auth_module_lines, log_path, template_text
from hpc.jobs.system import JobTag, Submission
from hpc.jobs.vllm_args import build_vllm_args, container_binds
from saia.base.durations import format_slurm_time

TEMPLATE = "batch.sh"


DRIVER = "saia_batch_driver.py"
_DRIVER_END = "SAIA_BATCH_DRIVER_END"


def server(service: ServiceConfig, config: AgentConfig) -> list[str]:
    """The model server's argv without --host/--port (the driver adds them): the stand-in
    for the `standin` template, else the service's `vllm serve` with its vLLM options."""
    python = config.python or sys.executable
    # The driver's key guards /v1 (the server checks VLLM_API_KEY); the job's middleware,
    # as in serving jobs, every other path of the port other users of the node can reach.
    guard = ["--middleware", "saia_backend_auth.BackendKeyMiddleware"] if service.api_key else []
    if service.template == "standin":
        command = list(service.server_command or [python, "-m", "hpc.standin"])
        return [*command, "--model-name", service.model_id, "--api-key-env", "VLLM_API_KEY",
                *guard, *service.server_args]  # fmt: skip
    if service.template not in ("vllm", "vllm-multinode") or service.resources.nodes > 1:
        raise JobScriptError(f"service {service.name}: batches run on one node with vllm")
    command = list(service.server_command or ["vllm", "serve"])
    argv = [*command, service.model, *build_vllm_args(service, config), *guard]
    if service.container:
        binds = [part for bind in container_binds(service, config) for part in ("--bind", bind)]
        argv = ["apptainer", "exec", "--nv", *binds, service.container, *argv]
    return argv


def runner(service: ServiceConfig, config: AgentConfig, batch_dir: Path) -> list[str]:
    """The driver's argv (`slurm/saia_batch_driver.py`, which the job writes into the batch
    dir) over the batch's files, then `--` and the server's argv."""
    knobs = config.batch
    return [
        config.python or sys.executable, str(batch_dir / DRIVER),
        "-i", str(batch_dir / "input.jsonl"), "-o", str(batch_dir / "output.jsonl"),
        "-e", str(batch_dir / "errors.jsonl"), "--concurrency", str(knobs.concurrency),
        "--request-timeout", f"{knobs.request_timeout:g}", "--grace", f"{knobs.stop_grace:g}",
        "--", *server(service, config),
    ]  # fmt: skip


def driver_lines() -> list[str]:
    """`SAIA_BATCH_DRIVER=<slurm/saia_batch_driver.py>` as a quoted here-document."""
    text = template_text(DRIVER)
    if _DRIVER_END in text.splitlines():
        raise JobScriptError(f"slurm/{DRIVER} contains the line {_DRIVER_END}")
    return [
        f"# ---- slurm/{DRIVER} (slurm/batch.sh writes it into the batch dir)",
        f"IFS= read -r -d '' SAIA_BATCH_DRIVER <<'{_DRIVER_END}' || true",
        text.rstrip("\n"),
        _DRIVER_END,
    ]


def sbatch_lines(service: ServiceConfig, plan: JobPlan, state_dir: Path) -> list[str]:
    res = service.resources
    options = [f"--partition={shlex.quote(res.partition)}"] if res.partition else []
    options += ["--nodes=1", "--ntasks-per-node=1"]
    if res.gpus:
        options.append(f"--gres=gpu:{res.gpus}")
    options += [f"--cpus-per-task={res.cpus}", f"--mem={res.memory}"]
    options.append(f"--time={format_slurm_time(plan.time_limit_s)}")
    deadline = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(plan.deadline))
    options += [f"--deadline={deadline}", f"--nice={plan.nice}"]
    for flag, value in (
        ("account", plan.account),
        ("qos", plan.qos),
        ("constraint", res.constraint),
    ):
        if value:
            options.append(f"--{flag}={shlex.quote(value)}")
    options += [f"--output={shlex.quote(str(log_path(state_dir)))}", "--no-requeue"]
    return [f"#SBATCH {option}" for option in options]


def render_batch(
    batch_id: str,
    service: ServiceConfig,
    config: AgentConfig,
    tag: JobTag,
    plan: JobPlan,
    batch_dir: Path,
) -> Submission:
    argv = runner(service, config, batch_dir)
    values = {"SAIA_STATE_DIR": str(config.state_dir), "SAIA_BATCH_DIR": str(batch_dir),
              "SAIA_HF_HOME": service.hf_home or ""}  # fmt: skip
    lines = [
        "#!/bin/bash",
        *sbatch_lines(service, plan, config.state_dir),
        f"# saia batch job {batch_id} of service {service.name!r}; generated by hpc.batch.script.",
        "set -euo pipefail",
        *(f"export {key}={shlex.quote(value)}" for key, value in values.items()),
        *(f"export {key}={shlex.quote(value)}" for key, value in service.environment.items()),
        "SAIA_BATCH_RUNNER=(" + " ".join(shlex.quote(part) for part in argv) + ")",
        *driver_lines(),
        *(auth_module_lines() if service.api_key else []),
        f"# ---- slurm/{TEMPLATE}",
        template_text(TEMPLATE).rstrip("\n"),
    ]
    name = batch_id  # job name <prefix>-batch-...; the comment tells it from services
    return Submission(
        service=name, script="\n".join(lines) + "\n", job_name=tag.job_name(name),
        comment=tag.comment, log_path=log_path(config.state_dir), environment={},
    )  # fmt: skip
