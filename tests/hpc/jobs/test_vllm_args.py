"""`build_vllm_args`: every service option becomes the vLLM 0.32 flag it means."""

from __future__ import annotations

from typing import Any

import pytest

from hpc.config import AgentConfig, ConfigError, ServiceConfig, parse_config
from hpc.jobs.vllm_args import build_vllm_args


def configured(service: dict[str, Any]) -> tuple[ServiceConfig, AgentConfig]:
    config = parse_config({"state_dir": "/srv/saia", "services": [service]})
    return config.services[0], config


def args_of(**service: Any) -> list[str]:
    return build_vllm_args(*configured({"name": "llama", "model": "/models/llama", **service}))


def test_defaults_name_the_model_and_use_the_gpus_of_one_node() -> None:
    assert args_of() == ["--served-model-name", "llama", "--tensor-parallel-size", "1"]


def test_served_model_name_wins_over_the_service_name() -> None:
    args = args_of(served_model_name="meta/llama-3")
    assert args[:2] == ["--served-model-name", "meta/llama-3"]


def test_tensor_parallel_is_gpus_per_node() -> None:
    args = args_of(resources={"gpus": 4})
    assert args[2:] == ["--tensor-parallel-size", "4"]
    assert "--pipeline-parallel-size" not in args


def test_cpu_only_service_still_gets_one_tensor_parallel_rank() -> None:
    assert args_of(resources={"gpus": 0})[2:] == ["--tensor-parallel-size", "1"]


def test_multi_node_is_pipeline_over_nodes_on_ray() -> None:
    args = args_of(resources={"nodes": 3, "gpus": 4})
    assert args[2:] == [
        "--tensor-parallel-size",
        "4",
        "--pipeline-parallel-size",
        "3",
        "--distributed-executor-backend",
        "ray",
    ]


def test_every_option_maps_to_its_flag_in_order() -> None:
    options = {
        "max_model_len": 8192,
        "quantization": "awq",
        "gpu_memory_utilization": 0.85,
        "dtype": "bfloat16",
        "chat_template": "/models/llama/chat.jinja",
        "tool_call_parser": "llama3_json",
        "enable_auto_tool_choice": True,
        "enforce_eager": True,
    }
    assert args_of(vllm=options)[4:] == [
        "--max-model-len",
        "8192",
        "--quantization",
        "awq",
        "--gpu-memory-utilization",
        "0.85",
        "--dtype",
        "bfloat16",
        "--chat-template",
        "/models/llama/chat.jinja",
        "--tool-call-parser",
        "llama3_json",
        "--enable-auto-tool-choice",
        "--enforce-eager",
    ]


def test_embeddings_use_the_pooling_runner_not_the_removed_task_flag() -> None:
    args = args_of(vllm={"task": "embed"})
    assert args[4:] == ["--runner", "pooling"]
    assert "--task" not in args


def test_server_args_come_last_so_they_can_override() -> None:
    args = args_of(vllm={"max_model_len": 4096}, server_args=["--max-model-len", "2048", "-q"])
    assert args[-3:] == ["--max-model-len", "2048", "-q"]
    assert args.index("4096") < args.index("2048")


def test_the_backend_key_never_appears_in_the_arguments() -> None:
    args = args_of(api_key=True)
    assert not any("api-key" in arg or "api_key" in arg for arg in args)


def test_auto_tool_choice_without_a_parser_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="enable_auto_tool_choice needs a tool_call_parser"):
        configured({"name": "x", "model": "m", "vllm": {"enable_auto_tool_choice": True}})


def test_unknown_task_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"services\[0\]\.vllm\.task"):
        configured({"name": "x", "model": "m", "vllm": {"task": "classify"}})
