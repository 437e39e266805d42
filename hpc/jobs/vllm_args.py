"""The `vllm serve` options of a service, from its configuration (pure).

The job template adds the model, `--host` and `--port`; everything else a service sets
comes from here, checked against `vllm serve --help=all` of vLLM 0.32. The operator's
`server_args` come last, so they can override anything (argparse keeps the last value).
The backend key is never an option: vLLM reads `VLLM_API_KEY` from the environment, which
keeps it out of `ps`.
"""

from __future__ import annotations

import json

from hpc.config import AgentConfig, ServiceConfig, VllmOptions


def parallel_args(service: ServiceConfig) -> list[str]:
    """Tensor parallel over the GPUs of a node, pipeline parallel over the nodes."""
    resources = service.resources
    args = ["--tensor-parallel-size", str(max(1, resources.gpus))]
    if resources.nodes > 1:
        # Ray spans the nodes; "mp" would only ever see the head node's GPUs.
        args += [
            "--pipeline-parallel-size",
            str(resources.nodes),
            "--distributed-executor-backend",
            "ray",
        ]
    return args


def option_args(options: VllmOptions) -> list[str]:
    """The per-service vLLM options; None leaves vLLM's own default."""
    args: list[str] = []
    valued: list[tuple[str, object]] = [
        ("--max-model-len", options.max_model_len),
        ("--quantization", options.quantization),
        ("--gpu-memory-utilization", options.gpu_memory_utilization),
        ("--dtype", options.dtype),
        ("--chat-template", options.chat_template),
        ("--tool-call-parser", options.tool_call_parser),
        ("--scheduling-policy", options.scheduling_policy),
    ]
    for flag, value in valued:
        if value is not None:
            args += [flag, str(value)]
    if options.enable_auto_tool_choice:
        args.append("--enable-auto-tool-choice")
    if options.enforce_eager:
        args.append("--enforce-eager")
    if options.task in ("embed", "score"):
        # vLLM 0.32 has no `--task`: the pooling runner serves /v1/embeddings, and
        # /v1/rerank and /v1/score for a cross-encoder; its `--convert auto` keeps
        # embedding and classification checkpoints as they are.
        args += ["--runner", "pooling"]
    return args


def lora_args(service: ServiceConfig) -> list[str]:
    """The service's LoRA adapters, each served under its own model id. JSON entries, as
    vLLM 0.32's `--lora-modules` reads them: a path may hold `=` or `,`, which its older
    `name=path` form would split. All may be active in one batch (`--max-loras`)."""
    if not service.adapters:
        return []
    modules = [
        json.dumps({"name": name, "path": path, "base_model_name": service.model_id})
        for name, path in service.adapters.items()
    ]
    return ["--enable-lora", "--max-loras", str(len(modules)), "--lora-modules", *modules]


def build_vllm_args(service: ServiceConfig, config: AgentConfig) -> list[str]:
    """Options after `vllm serve MODEL --host H --port P`, for the job script."""
    return [
        "--served-model-name",
        service.model_id,
        *parallel_args(service),
        *option_args(service.vllm),
        *lora_args(service),
        *service.server_args,
    ]


def container_binds(service: ServiceConfig, config: AgentConfig) -> list[str]:
    """Apptainer binds: the operator's, then what a job reads or writes outside the image.

    The state dir (endpoint, key, vLLM's cache in the job dir), HF_HOME, a model and a chat
    template given as absolute paths. Without a container only the operator's list is kept.
    """
    binds = list(service.container_binds)
    if not service.container:
        return binds
    paths = [str(config.state_dir), service.hf_home, service.model, service.vllm.chat_template]
    for path in paths:
        if path and path.startswith("/") and path not in binds:
            binds.append(path)
    return binds
