"""Files an agent config names that do not exist on this host (`saia hpc check-config`).

Validation (`hpc/config.py`) checks the shape of the file; this checks the world: a typo
in a model or image path would otherwise show only when a job fails to start, minutes
later. Only absolute paths are looked at: a model may also be a hub name
(`org/model`) and a container an `oras://` or `docker://` reference.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from hpc.config import AgentConfig, ServiceConfig


def _service_paths(index: int, service: ServiceConfig) -> Iterator[tuple[str, str]]:
    key = f"services[{index}]"
    yield f"{key}.model", service.model
    if service.container:
        yield f"{key}.container", service.container
    for number, bind in enumerate(service.container_binds):
        yield f"{key}.container_binds[{number}]", bind.split(":", 1)[0]
    if service.server_command:
        yield f"{key}.server_command[0]", service.server_command[0]
    if service.hf_home:
        yield f"{key}.hf_home", service.hf_home


def _paths(config: AgentConfig) -> Iterator[tuple[str, str]]:
    yield "state_dir (its parent)", str(config.state_dir.parent)
    if config.slurm_bin_dir:
        yield "slurm_bin_dir", str(config.slurm_bin_dir)
    if config.slurm_conf:
        yield "slurm_conf", str(config.slurm_conf)
    if config.python:
        yield "python", config.python
    for index, service in enumerate(config.services):
        yield from _service_paths(index, service)


def missing_paths(config: AgentConfig) -> list[str]:
    """One `KEY: PATH does not exist` line per absolute path that is not there."""
    return [
        f"{key}: {path} does not exist"
        for key, path in _paths(config)
        if path.startswith("/") and not Path(path).exists()
    ]
