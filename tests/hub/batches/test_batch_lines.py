"""The pure line handling of batch files: the checker across chunk boundaries, output
lines sorted into output and error files, the final status, and model renaming."""

from __future__ import annotations

import json

import pytest

from hub.batches.lines import (
    LineChecker,
    LineError,
    final_status,
    read_output_line,
    renamed_line,
)


def checker() -> LineChecker:
    return LineChecker(200, 3, lambda model: None if model == "m" else f"no model {model}")


def line(custom_id: str, model: str = "m") -> bytes:
    body = {"model": model, "messages": []}
    request = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions"}
    return json.dumps({**request, "body": body}).encode() + b"\n"


def test_lines_split_anywhere_between_chunks() -> None:
    data = line("a") + b"\n" + line("b")
    for cut in range(len(data)):
        check = checker()
        check.feed(data[:cut])
        check.feed(data[cut:])
        summary = check.finish()
        assert (summary.lines, summary.model, summary.url) == (2, "m", "/v1/chat/completions")


def test_the_first_bad_line_is_named() -> None:
    cases = {
        line("a") + line("b") + line("c") + line("d"): "line 4 is past the limit of 3 requests",
        line("a") + b"x" * 300: "line 2 is longer than 200 bytes",
        line("a", "z"): "line 1 no model z",
        line("a") + b"[1]\n": "line 2 is not a JSON object",
        line("a").replace(b'"POST"', b'"GET"'): 'line 1 needs "method": "POST"',
    }
    for data, message in cases.items():
        check = checker()
        with pytest.raises(LineError) as caught:
            check.feed(data)
            check.finish()
        assert str(caught.value) == message


def test_output_lines_are_sorted_and_counted() -> None:
    answer = {"custom_id": "a", "error": None, "response": {"status_code": 200,
              "body": {"usage": {"prompt_tokens": 3, "completion_tokens": 5}}}}  # fmt: skip
    refused = {"custom_id": "b", "error": "bad", "response": {"status_code": 400, "body": None}}
    good, bad = read_output_line(json.dumps(answer).encode()), read_output_line(
        json.dumps(refused).encode())  # fmt: skip
    assert good is not None and (good.ok, good.prompt_tokens, good.completion_tokens) == (
        True,
        3,
        5,
    )
    assert bad is not None and not bad.ok and bad.custom_id == "b"
    assert read_output_line(b"not json") is None


def test_final_status() -> None:
    assert final_status("completed", True, True) == "completed"  # it finished first
    assert final_status("failed", False, True) == "expired"
    assert final_status("cancelled", True, False) == "cancelled"
    assert final_status("failed", True, False) == "cancelled"
    assert final_status("failed", False, False) == "failed"


def test_models_are_renamed_between_public_and_upstream_names() -> None:
    raw = line("a", "public").rstrip()
    renamed = json.loads(renamed_line(raw, ("body", "model"), "public", "upstream"))
    assert renamed["body"]["model"] == "upstream" and renamed["custom_id"] == "a"
    assert renamed_line(raw, ("body", "model"), "other", "x") == raw
