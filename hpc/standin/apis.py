"""The stand-in's answers to the APIs beyond chat: Responses, Anthropic Messages, rerank,
score and audio, in vLLM 0.32's shapes (read from its source: entrypoints/openai/responses,
entrypoints/anthropic, entrypoints/pooling/scoring, entrypoints/speech_to_text).

The "model" is the stand-in's echo (`hpc.standin.model`): one token per word, so a test
predicts every answer and every usage figure.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from hpc.standin.model import ApiError, embedding, reply_tokens, words_of
from hpc.standin.shapes import (
    AUDIO_BYTES_PER_SECOND,
    MessagesRequest,
    RerankRequest,
    ResponsesRequest,
    ScoreRequest,
    anthropic_usage,
    event,
    response_object,
    responses_text_events,
    text_of_blocks,
    text_of_input,
)

Json = Callable[[Request], Awaitable[dict[str, Any]]]


class Standin(Protocol):
    """What these handlers use of `hpc.standin.server.Standin` (its model and gauges)."""

    model_name: str
    token_delay: float
    max_tokens_default: int
    prompt_tokens_total: int
    generation_tokens_total: int

    def slot(self) -> AbstractAsyncContextManager[None]: ...

    def check_model(self, model: str) -> None: ...


class Apis:
    """Handlers of the further endpoints of one stand-in server."""

    def __init__(self, standin: Standin, json_body: Json) -> None:
        self.standin = standin
        self.json_body = json_body

    async def _generate(self, prompt: str, max_tokens: int | None) -> tuple[list[str], str, int]:
        """The answer's tokens, finish reason and prompt tokens, counted in the gauges."""
        standin = self.standin
        tokens, finish = reply_tokens(prompt, max_tokens or standin.max_tokens_default)
        prompt_tokens = len(words_of(prompt))
        async with standin.slot():
            standin.prompt_tokens_total += prompt_tokens
            if standin.token_delay:
                await asyncio.sleep(standin.token_delay * len(tokens))
            standin.generation_tokens_total += len(tokens)
        return tokens, finish, prompt_tokens

    # -- /v1/responses ------------------------------------------------------------------
    async def responses(self, request: Request) -> Response:
        body = ResponsesRequest.model_validate(await self.json_body(request))
        self.standin.check_model(body.model)
        prompt = " ".join(p for p in (body.instructions, text_of_input(body.input)) if p)
        tokens, finish, prompt_tokens = await self._generate(prompt, body.max_output_tokens)
        ident, created = f"resp_{uuid.uuid4().hex}", int(time.time())
        limit = body.max_output_tokens or self.standin.max_tokens_default
        if not body.stream:
            answer = response_object(body, ident, created, limit, (tokens, finish, prompt_tokens))
            return JSONResponse(answer)
        events = responses_text_events(body, ident, created, limit, (tokens, finish, prompt_tokens))
        return StreamingResponse(self._paced(events), media_type="text/event-stream")

    async def _paced(self, events: list[bytes]) -> AsyncIterator[bytes]:
        for chunk in events:
            if self.standin.token_delay and b".delta" in chunk[:60]:
                await asyncio.sleep(self.standin.token_delay)
            yield chunk

    # -- /v1/messages (Anthropic) -------------------------------------------------------
    async def messages(self, request: Request) -> Response:
        try:
            body = MessagesRequest.model_validate(await self.json_body(request))
            self.standin.check_model(body.model)
        except ApiError as error:
            return anthropic_error(error.status, error.message)
        system = text_of_blocks(body.system) if body.system is not None else ""
        texts = [text_of_blocks(m.content) for m in body.messages]
        prompt = " ".join(t for t in (system, *texts) if t)
        tokens, finish, prompt_tokens = await self._generate(prompt, body.max_tokens)
        ident = f"chatcmpl-{uuid.uuid4().hex}"  # vLLM passes its chat completion's id
        stop = "max_tokens" if finish == "length" else "end_turn"
        if not body.stream:
            return JSONResponse(
                {
                    "id": ident,
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "text", "text": " ".join(tokens)}],
                    "model": body.model,
                    "stop_reason": stop,
                    "usage": anthropic_usage(prompt_tokens, len(tokens)),
                }
            )
        chunks = self._message_events((ident, body.model), tokens, stop, prompt_tokens)
        return StreamingResponse(chunks, media_type="text/event-stream")

    async def _message_events(
        self, named: tuple[str, str], tokens: list[str], stop: str, prompt_tokens: int
    ) -> AsyncIterator[bytes]:
        """vLLM's order: message_start (prompt usage), one text block, message_delta (the
        final usage), message_stop; `event:` lines name each. named: (id, model)."""
        ident, model = named
        message: dict[str, Any] = {
            "id": ident, "type": "message", "role": "assistant", "content": [],
            "model": model, "stop_reason": None, "stop_sequence": None,
            "usage": anthropic_usage(prompt_tokens, 0),
        }  # fmt: skip
        yield event("message_start", {"type": "message_start", "message": message})
        block = {"type": "content_block_start", "index": 0}
        yield event("content_block_start", block | {"content_block": {"type": "text", "text": ""}})
        for index, word in enumerate(tokens):
            if self.standin.token_delay:
                await asyncio.sleep(self.standin.token_delay)
            delta = {"type": "text_delta", "text": word if index == 0 else f" {word}"}
            yield event(
                "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}
            )
        yield event("content_block_stop", {"type": "content_block_stop", "index": 0})
        done = {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None}}
        yield event("message_delta", done | {"usage": anthropic_usage(prompt_tokens, len(tokens))})
        yield event("message_stop", {"type": "message_stop"})

    # -- /v1/rerank and /v1/score -------------------------------------------------------
    async def rerank(self, request: Request) -> Response:
        body = RerankRequest.model_validate(await self.json_body(request))
        self.standin.check_model(body.model)
        documents = [body.documents] if isinstance(body.documents, str) else body.documents
        scores = [similarity(body.query, doc) for doc in documents]
        order = sorted(range(len(documents)), key=lambda i: -scores[i])
        if body.top_n:
            order = order[: body.top_n]
        results = [
            {"index": i, "document": {"text": documents[i]}, "relevance_score": scores[i]}
            for i in order
        ]
        tokens = sum(len(words_of(body.query)) + len(words_of(doc)) for doc in documents)
        self.standin.prompt_tokens_total += tokens
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        ident = f"rerank-{uuid.uuid4().hex}"
        return JSONResponse({"id": ident, "model": body.model, "usage": usage, "results": results})

    async def score(self, request: Request) -> Response:
        body = ScoreRequest.model_validate(await self.json_body(request))
        self.standin.check_model(body.model)
        pairs = body.pairs()
        data = [
            {"index": i, "object": "score", "score": similarity(a, b)}
            for i, (a, b) in enumerate(pairs)
        ]
        tokens = sum(len(words_of(a)) + len(words_of(b)) for a, b in pairs)
        self.standin.prompt_tokens_total += tokens
        return JSONResponse(
            {
                "id": f"score-{uuid.uuid4().hex}",
                "object": "list",
                "created": int(time.time()),
                "model": body.model,
                "data": data,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
            }
        )

    # -- /v1/audio/transcriptions and /translations -------------------------------------
    async def transcriptions(self, request: Request) -> Response:
        return await self._audio(request, translate=False)

    async def translations(self, request: Request) -> Response:
        return await self._audio(request, translate=True)

    async def _audio(self, request: Request, *, translate: bool) -> Response:
        """The "transcript" names the upload's size; usage is its duration in seconds
        (16 kHz 16-bit mono), as vLLM reports for a transcription (none for a translation)."""
        async with request.form(max_part_size=64 * 1024 * 1024) as form:
            model, upload = form.get("model"), form.get("file")
            if not isinstance(model, str):
                raise ApiError(400, "model: Field required", "model")
            self.standin.check_model(model)
            if upload is None or isinstance(upload, str):
                raise ApiError(400, "file: Field required", "file")
            size = 0
            while chunk := await upload.read(64 * 1024):
                size += len(chunk)
        text = f"{'translated' if translate else 'transcribed'} {size} bytes of audio"
        if translate:
            return JSONResponse({"text": text})
        seconds = max(1, round(size / AUDIO_BYTES_PER_SECOND))
        return JSONResponse({"text": text, "usage": {"type": "duration", "seconds": seconds}})


def similarity(a: str, b: str) -> float:
    """A deterministic relevance in [0, 1]: the cosine of the stand-in's embeddings, mapped."""
    cosine = sum(x * y for x, y in zip(embedding(a), embedding(b), strict=True))
    return round((cosine + 1) / 2, 6)


def anthropic_error(status: int, message: str) -> JSONResponse:
    """vLLM's /v1/messages errors: Anthropic's shape."""
    kind = {400: "BadRequestError", 404: "NotFoundError"}.get(status, "InternalServerError")
    body = {"type": "error", "error": {"type": kind, "message": message}}
    return JSONResponse(body, status_code=status)


def further_routes(apis: Apis) -> list[tuple[str, Callable[[Request], Awaitable[Response]], str]]:
    """(path, handler, method) of these endpoints, at vLLM's paths."""
    return [
        ("/v1/responses", apis.responses, "POST"),
        ("/v1/messages", apis.messages, "POST"),
        ("/v1/rerank", apis.rerank, "POST"),
        ("/rerank", apis.rerank, "POST"),
        ("/v2/rerank", apis.rerank, "POST"),
        ("/v1/score", apis.score, "POST"),
        ("/score", apis.score, "POST"),
        ("/v1/audio/transcriptions", apis.transcriptions, "POST"),
        ("/v1/audio/translations", apis.translations, "POST"),
    ]
