"""`python -m hpc.standin run-batch -i IN -o OUT --model-name NAME`: vLLM's run-batch, stand-in.

Same files as `vllm run-batch`: input lines `{"custom_id", "method", "url", "body"}`, output
lines `{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`,
and the same progress line on stderr ("Running batch: P% Completed | N/T"). Unlike vLLM it
appends each answer as it is made (flushed), so a stopped job leaves its partial output.
It answers with the stand-in's deterministic echo; `--token-delay` paces it.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import uuid
from pathlib import Path
from types import FrameType
from typing import Any

from pydantic import ValidationError

from hpc.standin.model import (
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    GenerationRequest,
    chat_prompt,
    completion,
    completion_id,
    embedding,
    reply_tokens,
    words_of,
)

PROGRESS_EVERY = 0.5  # seconds between progress lines


def answer(url: str, body: dict[str, Any], model_name: str) -> tuple[int, dict[str, Any]]:
    """(status, body) of one request, like the stand-in server's non-streamed answers."""
    if body.get("model") != model_name:
        return 404, {"error": {"message": f"The model `{body.get('model')}` does not exist."}}
    try:
        if url == "/v1/embeddings":
            return 200, _embed(EmbeddingRequest.model_validate(body), model_name)
        if url == "/v1/chat/completions":
            chat = ChatRequest.model_validate(body)
            return 200, _generate(chat, chat_prompt(chat.messages), model_name, True)
        plain = CompletionRequest.model_validate(body)
        prompt = plain.prompt if isinstance(plain.prompt, str) else " ".join(plain.prompt)
        return 200, _generate(plain, prompt, model_name, False)
    except ValidationError as error:
        return 400, {"error": {"message": str(error).splitlines()[0]}}


def _embed(request: EmbeddingRequest, model_name: str) -> dict[str, Any]:
    texts = [request.input] if isinstance(request.input, str) else request.input
    tokens = sum(len(words_of(text)) for text in texts)
    data = [
        {"object": "embedding", "index": i, "embedding": embedding(t)} for i, t in enumerate(texts)
    ]
    usage_ = {"prompt_tokens": tokens, "total_tokens": tokens}
    return {"object": "list", "model": model_name, "data": data, "usage": usage_}


def _generate(
    request: GenerationRequest, prompt: str, model_name: str, chat: bool
) -> dict[str, Any]:
    limit = request.max_completion_tokens or request.max_tokens or 16
    tokens, finish = reply_tokens(prompt, limit)
    prompt_tokens = len(words_of(prompt))
    return completion(completion_id(chat), model_name, chat, tokens, finish, prompt_tokens)


def output_line(raw: str, model_name: str) -> dict[str, Any]:
    request = json.loads(raw)
    status, body = answer(str(request.get("url")), request.get("body") or {}, model_name)
    response = {"status_code": status, "request_id": f"vllm-batch-{uuid.uuid4().hex}",
                "body": body if status == 200 else None}  # fmt: skip
    error = None if status == 200 else body["error"]["message"]
    return {"id": f"vllm-{uuid.uuid4().hex}", "custom_id": request.get("custom_id"),
            "response": response, "error": error}  # fmt: skip


def progress(done: int, total: int) -> None:
    percent = round(100 * done / total) if total else 100
    print(f"Running batch: {percent:3d}% Completed | {done}/{total}", file=sys.stderr, flush=True)


def _stop(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # the output written so far stays


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpc.standin run-batch")
    parser.add_argument("-i", "--input-file", required=True, type=Path)
    parser.add_argument("-o", "--output-file", required=True, type=Path)
    parser.add_argument("--model-name", "--served-model-name", required=True)
    parser.add_argument("--token-delay", type=float, default=0.0)
    args, _ignored = parser.parse_known_args(argv)  # the server's other options
    signal.signal(signal.SIGTERM, _stop)
    lines = [line for line in args.input_file.read_text().splitlines() if line.strip()]
    last = 0.0
    with args.output_file.open("w", encoding="utf-8") as out:
        for done, raw in enumerate(lines):
            if time.monotonic() - last > PROGRESS_EVERY:
                progress(done, len(lines))
                last = time.monotonic()
            line = output_line(raw, args.model_name)
            produced = (line["response"]["body"] or {}).get("usage", {})
            time.sleep(args.token_delay * produced.get("completion_tokens", 0))
            out.write(json.dumps(line) + "\n")
            out.flush()
    progress(len(lines), len(lines))
    return 0
