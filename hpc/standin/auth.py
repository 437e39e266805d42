"""The stand-in's key checks, shaped like vLLM 0.32's so tests see what vLLM does.

vLLM checks `VLLM_API_KEY` only on paths under `/v1` (and three other prefixes); its
`--middleware` option adds an operator's ASGI middleware (a job with a key adds
slurm/saia_backend_auth.py, which guards every path). The stand-in has both, so a test
against it shows the gap and the job's fix.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib
import inspect
from typing import Any

from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

# vLLM 0.32 (vllm/entrypoints/serve/middleware/authenticate.py): these prefixes only.
GUARDED_PREFIX = ("/v1", "/v2", "/inference", "/cohere")
UNAUTHORIZED = {
    "error": {
        "message": "Unauthorized: a valid API key is required",
        "type": "AuthenticationError",
        "param": None,
        "code": 401,
    }
}


class V1KeyMiddleware:
    """vLLM's own check: the key on `GUARDED_PREFIX` paths (not for OPTIONS); every other
    path answers without it."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = hashlib.sha256(api_key.encode()).digest()

    def authorized(self, request: Request) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        digest = hashlib.sha256(token.encode()).digest()
        return scheme.lower() == "bearer" and hmac.compare_digest(digest, self.expected)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        guarded = scope["type"] == "http" and scope["method"] != "OPTIONS"
        guarded = guarded and scope["path"].startswith(GUARDED_PREFIX)
        if guarded and not self.authorized(Request(scope)):
            await JSONResponse(UNAUTHORIZED, status_code=401)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def server_middleware(paths: list[str]) -> list[Middleware]:
    """`--middleware` as in vLLM: each an import path of an ASGI middleware class."""
    found = []
    for path in paths:
        module, _, name = path.rpartition(".")
        try:
            imported: Any = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError) as error:
            raise SystemExit(f"standin: --middleware {path}: {error}") from None
        if not inspect.isclass(imported):
            raise SystemExit(f"standin: --middleware {path} is not a class")
        found.append(Middleware(imported))  # type: ignore[arg-type]  # any ASGI class
    return found
