"""The job script renderer: exact #SBATCH lines, quoting of hostile values, valid bash."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from hpc.config import AgentConfig, ServiceConfig
from hpc.jobs.script import (
    ARG_BUILDERS,
    JobScriptError,
    job_variables,
    render_job,
    sbatch_lines,
    stop_warning,
)
from hpc.jobs.system import JobTag

TAG = JobTag(prefix="saia", agent_id="login1")
HOSTILE = 'it\'s a "test" $(touch /tmp/saia-pwned) `id`; rm -rf / \n next'


def make(service: dict[str, Any], **agent: Any) -> tuple[ServiceConfig, AgentConfig]:
    config = AgentConfig.model_validate(
        {"state_dir": "/srv/saia", "python": "/opt/py/bin/python", **agent, "services": [service]}
    )
    return config.services[0], config


def bash_n(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-n"], input=script, capture_output=True, text=True, timeout=10, check=False
    )


def test_sbatch_lines_exactly() -> None:
    service, config = make(
        {
            "name": "llama/70b",
            "model": "/models/llama",
            "resources": {
                "partition": "gpu",
                "nodes": 2,
                "gpus": 4,
                "cpus": 16,
                "memory": "200G",
                "time_limit": "2-00:00:00",
                "account": "proj1",
                "qos": "normal",
                "constraint": "a100&ib",
                "extra_sbatch": ["--exclusive", "--reservation=my res"],
            },
        }
    )
    assert sbatch_lines(service, config, TAG) == [
        "#SBATCH --job-name=saia-llama/70b",
        "#SBATCH --comment=saia-agent:login1",
        "#SBATCH --partition=gpu",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gres=gpu:4",
        "#SBATCH --cpus-per-task=16",
        "#SBATCH --mem=200G",
        "#SBATCH --time=2-00:00:00",
        "#SBATCH --account=proj1",
        "#SBATCH --qos=normal",
        "#SBATCH --constraint='a100&ib'",
        "#SBATCH --output=/srv/saia/jobs/%j.log",
        "#SBATCH --signal=B:TERM@60",
        "#SBATCH --no-requeue",
        "#SBATCH --exclusive",
        "#SBATCH '--reservation=my res'",
    ]


def test_minimal_service_omits_optional_lines() -> None:
    service, config = make(
        {
            "name": "cpu",
            "model": "m",
            "renewal_lead": 60,
            "resources": {"gpus": 0, "time_limit": "10:00"},
        },
        job_prefix="t",
    )
    lines = sbatch_lines(service, config, JobTag(prefix="t", agent_id="a"))
    assert not any(flag in line for line in lines for flag in ("--gres", "--partition", "--qos"))
    assert "#SBATCH --time=0-00:10:00" in lines
    assert "#SBATCH --signal=B:TERM@60" in lines


def test_stop_warning_fits_short_limits() -> None:
    assert stop_warning(3600) == 60
    assert stop_warning(120) == 30
    assert stop_warning(2) == 1


def test_submission_fields() -> None:
    service, config = make({"name": "svc", "model": "m", "template": "standin"})
    submission = render_job(service, config, TAG)
    assert submission.service == "svc"
    assert submission.job_name == "saia-svc"
    assert submission.comment == "saia-agent:login1"
    assert submission.log_path == Path("/srv/saia/jobs/%j.log")
    assert submission.script.startswith("#!/bin/bash\n#SBATCH --job-name=saia-svc\n")


@pytest.mark.parametrize("template", sorted(ARG_BUILDERS))
def test_every_template_renders_valid_bash(template: str) -> None:
    service, config = make(
        {"name": "svc", "model": HOSTILE, "template": template, "server_args": [HOSTILE]}
    )
    script = render_job(service, config, TAG).script
    checked = bash_n(script)
    assert checked.returncode == 0, checked.stderr
    body = script.split("\n")
    first_code = next(i for i, line in enumerate(body) if line and not line.startswith("#"))
    assert all(line.startswith("#SBATCH ") for line in body[1:first_code] if "SBATCH" in line)
    assert "set -euo pipefail" in script


def test_hostile_values_stay_literal_in_bash() -> None:
    service, config = make(
        {
            "name": "svc",
            "model": HOSTILE,
            "template": "vllm",
            "server_args": ["--x", HOSTILE],
            "environment": {"MY_VAR": HOSTILE},
            "container_binds": [HOSTILE],
            "server_command": [HOSTILE, "serve"],
        }
    )
    lines = job_variables(service, config)
    show = 'printf "%s\\0" "$SAIA_MODEL" "$MY_VAR" "${SAIA_SERVER_ARGS[@]}" '
    show += '"${SAIA_CONTAINER_BINDS[@]}" "${SAIA_SERVER_COMMAND[@]}"'
    result = subprocess.run(
        ["bash", "-euc", "\n".join([*lines, show])],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    values = result.stdout.split("\0")[:-1]
    assert values == [
        HOSTILE,
        HOSTILE,
        "--served-model-name",
        "svc",
        "--tensor-parallel-size",
        "1",
        "--x",
        HOSTILE,
        HOSTILE,
        HOSTILE,
        "serve",
    ]
    assert not Path("/tmp/saia-pwned").exists()


def test_hostile_extra_sbatch_is_one_quoted_word() -> None:
    service, config = make(
        {"name": "svc", "model": "m", "resources": {"extra_sbatch": ["--x=$(id) `id`"]}}
    )
    assert sbatch_lines(service, config, TAG)[-1] == "#SBATCH '--x=$(id) `id`'"


def test_unknown_template_is_a_clear_error() -> None:
    service, config = make({"name": "svc", "model": "m", "template": "nosuch"})
    with pytest.raises(JobScriptError, match="unknown job template 'nosuch'"):
        render_job(service, config, TAG)


def test_bad_advertise_host_is_refused() -> None:
    service, config = make({"name": "svc", "model": "m"}, backend_advertise_host='x"; id; "')
    with pytest.raises(JobScriptError, match="not a host name"):
        render_job(service, config, TAG)


def test_vllm_args_basics() -> None:
    service, config = make(
        {"name": "svc", "model": "m", "served_model_name": "pub", "resources": {"gpus": 2}}
    )
    assert ARG_BUILDERS["vllm"](service, config) == [
        "--served-model-name",
        "pub",
        "--tensor-parallel-size",
        "2",
    ]
