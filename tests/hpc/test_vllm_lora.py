"""A LoRA adapter on the real vLLM 0.32: the flags `build_vllm_args` makes from a service's
`adapters` (`--enable-lora --max-loras --lora-modules` as JSON) start SmolLM2 with the
adapter, which vLLM lists as its own model id (parent: the base) and answers under its name.

The adapter is made here, in PEFT's format, without PEFT: rank 8 on every layer's q_proj,
with B = 0, so its answers must equal the base model's (greedy), token for token.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import struct
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from hpc.jobs.system import JobTag
from saia.sandbox.slurm import SlurmSandbox
from saia.sandbox.smollm2 import MODEL_NAME
from saia.sandbox.vllm import VllmInstall
from tests.fixtures.vllm import _start, _stop, smollm2_config

pytestmark = pytest.mark.vllm
ADAPTER = "smollm2-zero-lora"
RANK, HIDDEN, LAYERS = 8, 576, 30  # SmolLM2-135M: hidden size 576, 30 layers


def write_adapter(folder: Path) -> Path:
    """PEFT's adapter_config.json and adapter_model.safetensors (float32, written by hand:
    an 8-byte header length, the JSON header, then the tensors' bytes)."""
    folder.mkdir()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": 16,
        "lora_dropout": 0.0, "target_modules": ["q_proj"], "bias": "none",
        "fan_in_fan_out": False, "modules_to_save": None, "base_model_name_or_path": MODEL_NAME,
    }  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(config))
    header: dict[str, Any] = {}
    data = bytearray()
    for layer in range(LAYERS):
        prefix = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        for name, shape, value in (
            ("lora_A", [RANK, HIDDEN], 0.01),
            ("lora_B", [HIDDEN, RANK], 0.0),
        ):
            count = shape[0] * shape[1]
            header[f"{prefix}.{name}.weight"] = {
                "dtype": "F32", "shape": shape, "data_offsets": [len(data), len(data) + 4 * count]
            }  # fmt: skip
            data += struct.pack(f"<{count}f", *([value] * count))
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    (folder / "adapter_model.safetensors").write_bytes(
        struct.pack("<Q", len(encoded)) + encoded + bytes(data)
    )
    return folder


async def ask(client: httpx.AsyncClient, model: str) -> dict[str, Any]:
    question = [{"role": "user", "content": "What is the capital of France?"}]
    body = {"model": model, "messages": question, "max_tokens": 12, "temperature": 0}
    answer = await client.post("/v1/chat/completions", json=body)
    assert answer.status_code == 200, answer.text[:300]
    result: dict[str, Any] = answer.json()
    return result


def test_vllm_serves_a_declared_adapter_under_its_own_id(
    slurm_cluster: SlurmSandbox, vllm_install: VllmInstall, tmp_path: Path
) -> None:
    adapter = write_adapter(tmp_path / "adapter")
    plain = smollm2_config(slurm_cluster, vllm_install, tmp_path / "state")
    service = plain.services[0].model_copy(update={"adapters": {ADAPTER: str(adapter)}})
    config = plain.model_copy(update={"services": [service]})
    tag = JobTag(config.job_prefix, "lora-" + uuid.uuid4().hex[:6])
    job = asyncio.run(_start(config, tag))
    try:
        asyncio.run(check(job.url, job.key, job.verify))
    finally:
        asyncio.run(_stop(config, tag, job.job_id))


async def check(url: str, key: str, verify: ssl.SSLContext | bool) -> None:
    """`verify`: the job's own certificate, pinned (backend_tls, the default)."""
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(
        base_url=url, headers=headers, timeout=120, verify=verify, trust_env=False
    ) as client:
        models = {m["id"]: m for m in (await client.get("/v1/models")).json()["data"]}
        assert set(models) == {MODEL_NAME, ADAPTER}
        assert models[ADAPTER]["parent"] == MODEL_NAME
        base, adapted = await ask(client, MODEL_NAME), await ask(client, ADAPTER)
    assert adapted["model"] == ADAPTER and base["model"] == MODEL_NAME
    text = adapted["choices"][0]["message"]["content"]
    assert text == base["choices"][0]["message"]["content"] and "Paris" in text
    assert adapted["usage"] == base["usage"]  # the same tokens, counted the same
