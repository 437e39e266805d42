"""The demo's embedded configuration: the agent's and the hub's settings (`saia demo`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from saia.sandbox import smollm2

if TYPE_CHECKING:
    from saia.sandbox.slurm import SlurmSandbox
    from saia.sandbox.vllm import VllmInstall

MODEL_ID = "demo"
VLLM_MODEL_ID = smollm2.MODEL_NAME  # `--vllm` serves SmolLM2-135M-Instruct under this id


def model_id(use_vllm: bool) -> str:
    return VLLM_MODEL_ID if use_vllm else MODEL_ID


def agent_config(
    root: Path, *, executor: str, slurm: SlurmSandbox | None, vllm: VllmInstall | None
) -> dict[str, Any]:
    """The agent's YAML for the demo: one service, fast polling, loopback only."""
    service: dict[str, Any] = {
        "name": MODEL_ID,
        "model": MODEL_ID,
        "template": "standin",
        "resources": {"gpus": 1, "cpus": 1, "memory": "1G", "time_limit": "2:00:00"},
        "min_instances": 1,
        "max_instances": 2,
        "target_concurrency": 16,
        "renewal_lead": "5m",
        "startup_timeout": "2m",
        "display_name": "Demo model (stand-in server)",
        # The stand-in answers chat and embeddings alike (the demo shows both); a vLLM
        # service serves what its task gives (the default below).
        "endpoints": ["chat", "completions", "embeddings", "responses", "messages", "tokenize"],
    }
    if vllm is not None:
        service |= {
            "name": VLLM_MODEL_ID,
            "model": str(vllm.chat_model_dir),
            "template": "vllm",
            "server_command": [str(vllm.vllm), "serve"],
            "resources": {"gpus": 1, "cpus": 2, "memory": "4G", "time_limit": "4:00:00"},
            "startup_timeout": "15m",
            "environment": {"VLLM_CPU_KVCACHE_SPACE": "1"},
            "vllm": {"max_model_len": 2048, "dtype": "float32", "enforce_eager": True},
            "display_name": smollm2.DISPLAY_NAME,
            "endpoints": None,
        }
    config: dict[str, Any] = {
        "state_dir": str(root / "agent-state"),
        "executor": executor,
        "poll_interval": "1s",
        "health_interval": "2s",
        "backend_bind_host": "127.0.0.1",
        "backend_advertise_host": "127.0.0.1",
        "python": sys.executable,
        "router": {"queue_timeout": "15m" if vllm else "2m"},
        "services": [service],
    }
    if slurm is not None:
        config |= {"slurm_conf": str(slurm.slurm_conf), "slurm_bin_dir": str(slurm.bin_dir)}
    else:  # the local executor hands out no GPUs
        service["resources"] = service["resources"] | {"gpus": 0}
    return config


def hub_config(
    root: Path, port: int, site: dict[str, Any], *, use_vllm: bool = False
) -> dict[str, Any]:
    name = "SmolLM2-135M-Instruct" if use_vllm else "Demo model"
    return {
        "host": "127.0.0.1",
        "port": port,
        "data_dir": str(root / "hub-data"),
        "upstreams": {"cluster": {"kind": "hpc", "sites": [site]}},
        "models": [
            {"id": model_id(use_vllm), "upstream": "cluster", "name": name, "owned_by": "saia-demo"}
        ],
    }
