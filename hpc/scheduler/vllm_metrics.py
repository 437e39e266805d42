"""vLLM's Prometheus `/metrics` text, reduced to the load figures the agent cares about (pure).

vLLM labels its series with `model_name` (the served name) and `engine` (one per data-
parallel engine); figures of several engines of one model are summed. Anything that is not
a well-formed sample line is skipped: a backend's odd line must not break the agent.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

# name{labels} value [timestamp]; label values may hold escaped quotes and commas.
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_CACHE = "vllm:kv_cache_usage_perc"
PROMPT_TOKENS = "vllm:prompt_tokens_total"
GENERATION_TOKENS = "vllm:generation_tokens_total"
WANTED = frozenset({RUNNING, WAITING, KV_CACHE, PROMPT_TOKENS, GENERATION_TOKENS})


@dataclass
class VllmLoad:
    """One served model's load; kv_cache_usage is the mean fraction (0..1) over engines."""

    running: float = 0.0
    waiting: float = 0.0
    kv_cache_usage: float | None = None
    prompt_tokens: float = 0.0
    generation_tokens: float = 0.0
    _kv_samples: list[float] = field(default_factory=list, repr=False)


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def _unescape(value: str) -> str:
    return value.replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")


def parse_sample(line: str) -> Sample | None:
    """One sample line, or None for comments, blanks and anything malformed."""
    match = _SAMPLE.match(line.strip())
    if match is None:
        return None
    name, labels_text, value_text = match.groups()
    try:
        value = float(value_text)
    except ValueError:
        return None
    if math.isnan(value):
        return None
    labels = {key: _unescape(val) for key, val in _LABEL.findall(labels_text or "")}
    return Sample(name, labels, value)


def _add(load: VllmLoad, sample: Sample) -> None:
    if sample.name == RUNNING:
        load.running += sample.value
    elif sample.name == WAITING:
        load.waiting += sample.value
    elif sample.name == PROMPT_TOKENS:
        load.prompt_tokens += sample.value
    elif sample.name == GENERATION_TOKENS:
        load.generation_tokens += sample.value
    elif sample.name == KV_CACHE:
        load._kv_samples.append(sample.value)
        load.kv_cache_usage = sum(load._kv_samples) / len(load._kv_samples)


def parse_vllm_metrics(text: str) -> dict[str, VllmLoad]:
    """Load per served model name, from the text of a vLLM `/metrics` response."""
    loads: dict[str, VllmLoad] = {}
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        sample = parse_sample(line)
        if sample is None or sample.name not in WANTED:
            continue
        model = sample.labels.get("model_name", "")
        _add(loads.setdefault(model, VllmLoad()), sample)
    return loads
