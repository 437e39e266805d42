"""The stand-in model server: a small OpenAI-compatible server shaped like vLLM's.

Used by the fast tests, the benchmarks and `saia demo` where a real model is not needed.
It answers like `vllm serve` does (`/health`, `/v1/models`, chat and text completions,
streamed or not, embeddings, `/tokenize`, Prometheus `/metrics` with vLLM's gauges, and
Responses, Anthropic Messages, rerank, score and audio in `hpc/standin/apis.py`) but
"generates" deterministic text from the prompt: one token per word, so tests can predict
every answer. `/v1/models` names it: `owned_by: "saia-standin"`.

    python -m hpc.standin --host 127.0.0.1 --port 8000 --model-name tiny [--token-delay 0.01]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import signal
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

import uvicorn
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from hpc.standin.apis import Apis, further_routes
from hpc.standin.auth import V1KeyMiddleware, server_middleware
from hpc.standin.model import (
    EMBEDDING_DIM,
    MAX_MODEL_LEN,
    ApiError,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    GenerationRequest,
    StreamShape,
    TokenizeRequest,
    chat_prompt,
    completion,
    completion_id,
    embedding,
    lora_module,
    reply_tokens,
    sse,
    token_id,
    usage,
    words_of,
)

OWNER = "saia-standin"
_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
}


# -- the server -----------------------------------------------------------------------
class Standin:
    """Request handlers and load gauges of one stand-in server."""

    def __init__(
        self,
        model_name: str,
        *,
        api_key: str | None = None,
        token_delay: float = 0.0,
        max_tokens_default: int = 64,
        max_running: int = 0,
        adapters: dict[str, str] | None = None,
    ) -> None:
        self.model_name = model_name
        self.adapters = adapters or {}  # LoRA adapters: answered under their own name
        self.api_key = api_key
        self.token_delay = token_delay
        self.max_tokens_default = max_tokens_default
        self.running = 0
        self.waiting = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self._slots = asyncio.Semaphore(max_running) if max_running > 0 else None
        self.created = int(time.time())

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """One running request; beyond --max-running requests wait (and count as waiting)."""
        if self._slots is not None:
            self.waiting += 1
            try:
                await self._slots.acquire()
            finally:
                self.waiting -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            if self._slots is not None:
                self._slots.release()

    def check_model(self, model: str) -> None:
        if model != self.model_name and model not in self.adapters:
            raise ApiError(404, f"The model `{model}` does not exist.", "model")

    def max_tokens(self, request: GenerationRequest) -> int:
        return request.max_completion_tokens or request.max_tokens or self.max_tokens_default

    # -- endpoints ----------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        return Response(status_code=200)

    async def models(self, request: Request) -> Response:
        card = {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": OWNER,
            "root": self.model_name,
            "parent": None,
            "max_model_len": MAX_MODEL_LEN,
        }
        loras = [  # as vLLM lists an adapter: its path as root, the base model as parent
            {**card, "id": name, "root": path, "parent": self.model_name}
            for name, path in self.adapters.items()
        ]
        return JSONResponse({"object": "list", "data": [card, *loras]})

    async def metrics(self, request: Request) -> Response:
        label = json.dumps(self.model_name)
        lines = []
        for name, kind, value, text in (
            ("vllm:num_requests_running", "gauge", self.running, "Requests being generated."),
            ("vllm:num_requests_waiting", "gauge", self.waiting, "Requests waiting to run."),
            ("vllm:prompt_tokens_total", "counter", self.prompt_tokens_total, "Prompt tokens."),
            ("vllm:generation_tokens_total", "counter", self.generation_tokens_total, "Tokens."),
        ):
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            lines.append(f"{name}{{model_name={label}}} {float(value)}")
        return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    async def chat(self, request: Request) -> Response:
        body = ChatRequest.model_validate(await json_body(request))
        self.check_model(body.model)
        return await self.generate(body, chat_prompt(body.messages), chat=True)

    async def completions(self, request: Request) -> Response:
        body = CompletionRequest.model_validate(await json_body(request))
        self.check_model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "the stand-in takes exactly one prompt", "prompt")
        return await self.generate(body, prompts[0], chat=False)

    async def embeddings(self, request: Request) -> Response:
        body = EmbeddingRequest.model_validate(await json_body(request))
        self.check_model(body.model)
        texts = [body.input] if isinstance(body.input, str) else body.input
        data = []
        for index, text in enumerate(texts):
            vector: list[float] | str = embedding(text)
            if body.encoding_format == "base64":
                vector = base64.b64encode(struct.pack(f"<{EMBEDDING_DIM}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": vector})
        tokens = sum(len(words_of(text)) for text in texts)
        self.prompt_tokens_total += tokens
        return JSONResponse(
            {
                "object": "list",
                "model": body.model,
                "data": data,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    async def invocations(self, request: Request) -> Response:
        """vLLM's SageMaker-style route: chat when the body has messages, else completion."""
        # Starlette keeps the body once read, so the handler reads it again.
        handler = self.chat if "messages" in await json_body(request) else self.completions
        return await handler(request)

    async def tokenize(self, request: Request) -> Response:
        body = TokenizeRequest.model_validate(await json_body(request))
        if body.model is not None:
            self.check_model(body.model)
        if body.prompt is None and body.messages is None:
            raise ApiError(400, "give either prompt or messages", "prompt")
        text = body.prompt if body.prompt is not None else chat_prompt(body.messages or [])
        tokens = [token_id(word) for word in words_of(text)]
        return JSONResponse(
            {"count": len(tokens), "max_model_len": MAX_MODEL_LEN, "tokens": tokens}
        )

    # -- generation -----------------------------------------------------------------------
    async def generate(self, body: GenerationRequest, prompt: str, *, chat: bool) -> Response:
        tokens, finish = reply_tokens(prompt, self.max_tokens(body))
        prompt_tokens = len(words_of(prompt))
        ident = completion_id(chat)
        if body.stream:
            options = body.stream_options
            include_usage = bool(options and options.include_usage)
            continuous = bool(include_usage and options and options.continuous_usage_stats)
            created = int(time.time())
            shape = StreamShape(ident, body.model, chat, include_usage, created, continuous)
            chunks = self.stream(shape, tokens, finish, prompt_tokens)
            return StreamingResponse(chunks, media_type="text/event-stream")
        async with self.slot():
            self.prompt_tokens_total += prompt_tokens
            if self.token_delay:
                await asyncio.sleep(self.token_delay * len(tokens))
            self.generation_tokens_total += len(tokens)
        return JSONResponse(completion(ident, body.model, chat, tokens, finish, prompt_tokens))

    async def stream(
        self, shape: StreamShape, tokens: list[str], finish: str, prompt_tokens: int
    ) -> AsyncIterator[bytes]:
        """SSE chunks like vLLM/OpenAI: role, one chunk per token, finish, [usage], [DONE]."""
        async with self.slot():
            self.prompt_tokens_total += prompt_tokens
            if shape.chat:
                yield shape.chunk([shape.role()], **shape.progress(prompt_tokens, 0))
            for index, word in enumerate(tokens):
                if self.token_delay:
                    await asyncio.sleep(self.token_delay)
                self.generation_tokens_total += 1
                piece = shape.piece(word if index == 0 else f" {word}", None)
                yield shape.chunk([piece], **shape.progress(prompt_tokens, index + 1))
            done = shape.progress(prompt_tokens, len(tokens))
            yield shape.chunk([shape.piece(None, finish)], **done)
        if shape.include_usage:
            yield shape.chunk([], usage=usage(prompt_tokens, len(tokens)))
        yield sse("[DONE]")


# -- HTTP plumbing --------------------------------------------------------------------
def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = _ERROR_TYPES.get(status, "InternalServerError")
    error = {"message": message, "type": kind, "param": param, "code": status}
    return JSONResponse({"error": error}, status_code=status)


async def json_body(request: Request) -> dict[str, Any]:
    try:
        data = json.loads(await request.body())
    except ValueError:
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return data


Handler = Callable[[Request], Awaitable[Response]]


def guarded(handler: Handler) -> Handler:
    """Errors as OpenAI error JSON, like vLLM's."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as error:
            return error_response(error.status, error.message, error.param)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "body"
            return error_response(400, f"{where}: {first['msg']}", where)

    return endpoint


def build_app(standin: Standin, middleware: list[str] | None = None) -> Starlette:
    api = [
        ("/v1/models", standin.models, "GET"),
        ("/v1/chat/completions", standin.chat, "POST"),
        ("/v1/completions", standin.completions, "POST"),
        ("/v1/embeddings", standin.embeddings, "POST"),
        ("/invocations", standin.invocations, "POST"),
        ("/tokenize", standin.tokenize, "POST"),
        *further_routes(Apis(standin, json_body)),
    ]
    routes = [
        Route("/health", standin.health, methods=["GET"]),
        Route("/metrics", standin.metrics, methods=["GET"]),
        *(Route(path, guarded(fn), methods=[method]) for path, fn, method in api),
    ]
    # As in vLLM: the server's own key check, then the operator's middleware around it.
    stack = server_middleware(middleware or [])
    if standin.api_key is not None:
        stack.append(Middleware(V1KeyMiddleware, api_key=standin.api_key))

    async def not_found(request: Request, exc: Exception) -> Response:
        return error_response(404, f"no route {request.method} {request.url.path}")

    async def not_allowed(request: Request, exc: Exception) -> Response:
        return error_response(405, f"{request.method} is not allowed on {request.url.path}")

    return Starlette(
        routes=routes,
        middleware=stack,
        exception_handlers={404: not_found, 405: not_allowed},
    )


class StandinServer(uvicorn.Server):
    """uvicorn, but a SIGTERM/SIGINT stop exits 0 (uvicorn re-raises the signal by default)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _stop(self, sig: int, frame: FrameType | None) -> None:
        # A second signal while stopping gives up on open streams.
        self.force_exit = self.should_exit
        self.should_exit = True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m hpc.standin", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model-name", required=True)
    parser.add_argument("--api-key-env", help="environment variable holding the API key")
    parser.add_argument("--token-delay", type=float, default=0.0, help="seconds per token")
    parser.add_argument("--max-tokens-default", type=int, default=64)
    parser.add_argument("--max-running", type=int, default=0, help="0: no limit")
    # vLLM's LoRA options: adapters as `name=path` or JSON ({"name": .., "path": ..}).
    parser.add_argument("--lora-modules", nargs="+", default=[], type=lora_module)
    parser.add_argument("--enable-lora", action="store_true")
    parser.add_argument("--max-loras", type=int, default=1)
    # vLLM's (uvicorn's) TLS options: a job serves over TLS with its own certificate.
    parser.add_argument("--ssl-keyfile", help="the private key (PEM) to serve TLS with")
    parser.add_argument("--ssl-certfile", help="the certificate (PEM) to serve TLS with")
    parser.add_argument(
        "--middleware",
        action="append",
        default=[],
        help="import path of an ASGI middleware class (repeatable), as vLLM's option",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if (args.ssl_keyfile is None) != (args.ssl_certfile is None):
        raise SystemExit("standin: --ssl-keyfile and --ssl-certfile go together")
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    if args.api_key_env and not api_key:
        raise SystemExit(f"standin: environment variable {args.api_key_env} is empty or unset")
    standin = Standin(
        args.model_name,
        api_key=api_key,
        token_delay=args.token_delay,
        max_tokens_default=args.max_tokens_default,
        max_running=args.max_running,
        adapters=dict(args.lora_modules),
    )
    config = uvicorn.Config(
        build_app(standin, args.middleware),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=5,
        ssl_keyfile=args.ssl_keyfile,
        ssl_certfile=args.ssl_certfile,
        # As vLLM: idle keep-alive connections are closed after this many seconds.
        timeout_keep_alive=int(os.environ.get("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", "5")),
    )
    server = StandinServer(config)
    server.run()
    if not server.started:
        raise SystemExit(f"standin: could not serve on {args.host}:{args.port}")


if __name__ == "__main__":
    main()
