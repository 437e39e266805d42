"""`parse_vllm_metrics` on a real vLLM 0.32 /metrics response and on edge cases."""

from __future__ import annotations

from pathlib import Path

from hpc.scheduler.vllm_metrics import parse_sample, parse_vllm_metrics

RECORDED = Path(__file__).parents[1] / "data" / "vllm-0.32-metrics.txt"


def test_recorded_vllm_output_gives_the_tiny_models_load() -> None:
    text = RECORDED.read_text(encoding="utf-8")
    loads = parse_vllm_metrics(text)
    assert list(loads) == ["tiny"]
    load = loads["tiny"]
    assert (load.running, load.waiting, load.kv_cache_usage) == (0.0, 0.0, 0.0)
    # the recorded server had embedded two inputs of 3 prompt tokens in all, generated none
    assert load.prompt_tokens == 3.0
    assert load.generation_tokens == 0.0


def test_waiting_by_reason_is_not_counted_twice() -> None:
    text = "\n".join(
        [
            'vllm:num_requests_waiting{engine="0",model_name="m"} 4.0',
            'vllm:num_requests_waiting_by_reason{engine="0",model_name="m",reason="capacity"} 4.0',
        ]
    )
    assert parse_vllm_metrics(text)["m"].waiting == 4.0


def test_engines_of_one_model_are_summed_and_kv_cache_averaged() -> None:
    text = "\n".join(
        [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            'vllm:num_requests_running{engine="0",model_name="m"} 3.0',
            'vllm:num_requests_running{engine="1",model_name="m"} 2.0',
            'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5',
            'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.25',
            'vllm:num_requests_running{engine="0",model_name="other"} 7',
        ]
    )
    loads = parse_vllm_metrics(text)
    assert loads["m"].running == 5.0
    assert loads["m"].kv_cache_usage == 0.375
    assert loads["other"].running == 7.0
    assert loads["other"].kv_cache_usage is None


def test_malformed_lines_are_skipped_not_fatal() -> None:
    text = "\n".join(
        [
            "vllm:num_requests_running{engine=",
            'vllm:num_requests_running{model_name="m"} not-a-number',
            'vllm:num_requests_running{model_name="m"} NaN',
            "",
            'vllm:num_requests_waiting{model_name="m"} 2 1700000000000',
        ]
    )
    loads = parse_vllm_metrics(text)
    assert loads["m"].running == 0.0
    assert loads["m"].waiting == 2.0


def test_label_values_with_escapes() -> None:
    sample = parse_sample(r'vllm:num_requests_running{model_name="a \"q\", b\\c"} 1')
    assert sample is not None
    assert sample.labels == {"model_name": 'a "q", b\\c'}


def test_empty_text_has_no_models() -> None:
    assert parse_vllm_metrics("") == {}
