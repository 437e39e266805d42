"""ASGI middleware: the job's backend key on every HTTP path of the model server.

vLLM checks its own `VLLM_API_KEY` only on paths under `/v1`; `/invocations` (which runs
chat and completions), `/tokenize`, `/pooling`, `/score`, `/metrics` and the rest answer
anyone who finds the port. A job with a key starts its server with
`--middleware saia_backend_auth.BackendKeyMiddleware`, and this class then refuses every
request that lacks `Authorization: Bearer <VLLM_API_KEY>` (401, OpenAI error JSON) but one:
`/health` exactly, which says only "alive" (an empty 200) and which operators and health
checks call without the key. The agent's probes and router send the key everywhere anyway.

Stdlib only (Python 3.10+, as vLLM): the job copies this file into `<job dir>/python/` and puts
that folder on PYTHONPATH, so it imports in vLLM's venv or container, not saia's.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Awaitable, Callable
from typing import Any

KEY_VARIABLE = "VLLM_API_KEY"
# Exact paths (no prefix, no normalisation: "/health/../x" is not "/health") open to all.
OPEN_PATHS = frozenset({"/health"})
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]
_BODY = json.dumps(
    {
        "error": {
            "message": "Unauthorized: this backend needs its key",
            "type": "AuthenticationError",
            "param": None,
            "code": 401,
        }
    }
).encode()
# Policy violation: an ASGI close before accept is answered with HTTP 403.
_WEBSOCKET_REFUSED = 1008


def _digest(text: bytes) -> bytes:
    # Hashing first makes the comparison independent of the presented token's length.
    return hashlib.sha256(text).digest()


class BackendKeyMiddleware:
    """Lets a request through only with the right bearer key; fails closed without one."""

    def __init__(self, app: App, **_: object) -> None:
        key = os.environ.get(KEY_VARIABLE, "")
        if not key:
            # Serving unguarded because the key went missing would be the silent failure.
            raise RuntimeError(f"saia_backend_auth: {KEY_VARIABLE} is empty or unset")
        self.app = app
        self._expected = _digest(key.encode())

    def authorized(self, headers: list[tuple[bytes, bytes]]) -> bool:
        values = [value for name, value in headers if name.lower() == b"authorization"]
        if len(values) != 1:
            return False
        scheme, _, token = values[0].strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        return hmac.compare_digest(_digest(token.strip()), self._expected)

    def allowed(self, scope: Scope) -> bool:
        if scope["type"] == "http" and scope.get("path") in OPEN_PATHS:
            return True
        return self.authorized(scope.get("headers", []))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope.get("type")
        if kind not in ("http", "websocket") or self.allowed(scope):
            await self.app(scope, receive, send)  # lifespan, or an allowed request
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": _WEBSOCKET_REFUSED})
        else:
            await send(
                {
                    "type": "http.response.start",
                    "status": 401,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(_BODY)).encode()),
                        (b"www-authenticate", b"Bearer"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": _BODY})
