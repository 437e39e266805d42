"""Renders a service's Slurm batch script: `#SBATCH` lines, the values, the prologue, the body.

Pure: `render_job(service, config, tag)` turns configuration into a `Submission`; nothing
from a client request ever reaches a script, and every value is shell-quoted. The body
of a template lives in `slurm/<template>.sh` (package data); `slurm/common.sh` is the
prologue every template shares (`saia_serve`, port choice, graceful stop); a service with
a backend key also carries `slurm/saia_backend_auth.py`, the server's key middleware.

A job's output goes to `<state_dir>/jobs/<job_id>.log` (Slurm does not create folders);
the prologue links it as `<state_dir>/jobs/<job_id>/job.log` next to `endpoint.json`.
"""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from hpc.config import AgentConfig, ServiceConfig
from hpc.jobs.system import JobTag, Submission
from hpc.jobs.vllm_args import build_vllm_args, container_binds, lora_args
from saia.base.durations import format_slurm_time

TEMPLATE_PACKAGE = "slurm"
PROLOGUE = "common.sh"
# The middleware that puts the job's key on every path of the server (a job with a key
# writes it into its job dir): here as text, so neither vLLM's venv nor its container
# needs saia installed.
AUTH_MODULE = "saia_backend_auth.py"
_AUTH_END = "SAIA_AUTH_MODULE_END"
# Seconds between the --signal warning (SIGTERM to the batch shell) and the time limit.
STOP_WARNING_MAX = 60
_HOST = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.:-]*$")


class JobScriptError(ValueError):
    """A service that cannot be rendered into a job script; str() says why."""


def standin_args(service: ServiceConfig, config: AgentConfig) -> list[str]:
    return [*lora_args(service), *service.server_args]  # the stand-in takes vLLM's LoRA flags


# Per template: the server's own arguments (after host/port/model, which the body sets).
ARG_BUILDERS: dict[str, Callable[[ServiceConfig, AgentConfig], list[str]]] = {
    "vllm": build_vllm_args,
    "vllm-multinode": build_vllm_args,
    "standin": standin_args,
}


def log_path(state_dir: Path, job_id: str = "%j") -> Path:
    """The job's output file; with the default `%j` it is the pattern sbatch expands."""
    return state_dir / "jobs" / f"{job_id}.log"


def stop_warning(time_limit_s: int) -> int:
    """Seconds before the limit the batch shell gets SIGTERM: 60 s, at most a quarter."""
    return max(1, min(STOP_WARNING_MAX, time_limit_s // 4))


def tls_days(time_limit_s: int) -> int:
    """Validity of a job's certificate: whole days covering its time limit (openssl's
    unit), from the moment the job starts and makes it."""
    return time_limit_s // 86400 + 1


def template_text(name: str) -> str:
    """The text of `slurm/<name>`; JobScriptError when there is no such template."""
    try:
        return resources.files(TEMPLATE_PACKAGE).joinpath(name).read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError):
        raise JobScriptError(f"no job template file slurm/{name}") from None


def sbatch_lines(service: ServiceConfig, config: AgentConfig, tag: JobTag) -> list[str]:
    """The `#SBATCH` options, agent-owned first, then the operator's extra options."""
    res = service.resources
    limit = res.time_limit_seconds
    options = [
        f"--job-name={shlex.quote(tag.job_name(service.name))}",
        f"--comment={shlex.quote(tag.comment)}",
    ]
    if res.partition:
        options.append(f"--partition={shlex.quote(res.partition)}")
    options += [f"--nodes={res.nodes}", "--ntasks-per-node=1"]
    if res.gpus:
        options.append(f"--gres=gpu:{res.gpus}")
    options += [f"--cpus-per-task={res.cpus}", f"--mem={res.memory}"]
    options.append(f"--time={format_slurm_time(limit)}")
    if res.time_min is not None:  # backfill may grant less; renewal follows squeue's time left
        options.append(f"--time-min={format_slurm_time(res.time_min_seconds)}")
    for flag, value in (
        ("account", res.account),
        ("qos", res.qos),
        ("reservation", res.reservation),
        ("constraint", res.constraint),
    ):
        if value:
            options.append(f"--{flag}={shlex.quote(value)}")
    options += [
        f"--output={shlex.quote(str(log_path(config.state_dir)))}",
        f"--signal=B:TERM@{stop_warning(res.time_min_seconds)}",
        "--no-requeue",
    ]
    options += [shlex.quote(option) for option in res.extra_sbatch]
    return [f"#SBATCH {option}" for option in options]


def _array(values: list[str]) -> str:
    return "(" + " ".join(shlex.quote(value) for value in values) + ")"


def job_variables(service: ServiceConfig, config: AgentConfig) -> list[str]:
    """Shell assignments the prologue and the template body read."""
    builder = ARG_BUILDERS.get(service.template)
    if builder is None:
        known = ", ".join(sorted(ARG_BUILDERS))
        raise JobScriptError(f"unknown job template {service.template!r} (known: {known})")
    advertise = config.backend_advertise_host or ""
    for host in (config.backend_bind_host, advertise):
        if host and not _HOST.match(host):
            raise JobScriptError(f"{host!r} is not a host name or address")
    values = {
        "SAIA_STATE_DIR": str(config.state_dir),
        "SAIA_SERVICE": service.name,
        "SAIA_MODEL": service.model,
        "SAIA_SERVED_MODEL_NAME": service.model_id,
        "SAIA_BIND_HOST": config.backend_bind_host,
        "SAIA_ADVERTISE_HOST": advertise,
        "SAIA_GPUS_PER_NODE": str(service.resources.gpus),
        "SAIA_NODES": str(service.resources.nodes),
        "SAIA_CONTAINER": service.container or "",
        "SAIA_PYTHON": config.python or sys.executable,
        "SAIA_STOP_TIMEOUT": str(stop_warning(service.resources.time_min_seconds)),
        "SAIA_MAKE_API_KEY": "1" if service.api_key else "",
        "SAIA_BACKEND_TLS": "1" if service.backend_tls else "",
        "SAIA_TLS_DAYS": str(tls_days(service.resources.time_limit_seconds)),
        "SAIA_HF_HOME": service.hf_home or "",
        "SAIA_RAY_PORT": str(service.vllm.ray_port or ""),
        "SAIA_RAY_JOIN_TIMEOUT": str(round(service.vllm.ray_join_timeout)),
    }
    lines = [f"export {key}={shlex.quote(value)}" for key, value in values.items()]
    lines.append(f"SAIA_SERVER_ARGS={_array(builder(service, config))}")
    lines.append(f"SAIA_SERVER_COMMAND={_array(service.server_command or [])}")
    lines.append(f"SAIA_CONTAINER_BINDS={_array(container_binds(service, config))}")
    lines += [f"export {key}={shlex.quote(value)}" for key, value in service.environment.items()]
    return lines


def template_file(service: ServiceConfig) -> str:
    """The body's file: a `vllm` service on several nodes runs the Ray-based variant."""
    if service.template == "vllm" and service.resources.nodes > 1:
        return "vllm-multinode.sh"
    return f"{service.template}.sh"


def auth_module_lines() -> list[str]:
    """`SAIA_AUTH_MODULE=<slurm/saia_backend_auth.py>` as a quoted here-document."""
    return heredoc_lines(
        AUTH_MODULE, "SAIA_AUTH_MODULE", _AUTH_END, "the prologue writes it into the job dir"
    )


def heredoc_lines(name: str, variable: str, end: str, note: str) -> list[str]:
    """`<variable>=<slurm/<name>>` as a quoted here-document (the file travels inside the
    job script: compute nodes need not see this package)."""
    text = template_text(name)
    if end in text.splitlines():
        raise JobScriptError(f"slurm/{name} contains the line {end}")
    return [
        f"# ---- slurm/{name} ({note})",
        f"IFS= read -r -d '' {variable} <<'{end}' || true",
        text.rstrip("\n"),
        end,
    ]


def render_script(service: ServiceConfig, config: AgentConfig, tag: JobTag) -> str:
    variables = job_variables(service, config)
    body = template_text(template_file(service))
    parts = [
        "#!/bin/bash",
        *sbatch_lines(service, config, tag),
        f"# saia job for service {service.name!r}; generated by hpc.jobs.script, do not edit.",
        "set -euo pipefail",
        *variables,
        *(auth_module_lines() if service.api_key else []),
        f"# ---- slurm/{PROLOGUE}",
        template_text(PROLOGUE).rstrip("\n"),
        f"# ---- slurm/{template_file(service)}",
        body.rstrip("\n"),
    ]
    return "\n".join(parts) + "\n"


def render_job(service: ServiceConfig, config: AgentConfig, tag: JobTag) -> Submission:
    """The submission of one job of `service` for this agent."""
    return Submission(
        service=service.name,
        script=render_script(service, config, tag),
        job_name=tag.job_name(service.name),
        comment=tag.comment,
        log_path=log_path(config.state_dir),
        environment={},
    )
