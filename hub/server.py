"""How the hub is served: the uvicorn settings `saia hub serve` and the tests share."""

from __future__ import annotations

from typing import Any

import uvicorn


def uvicorn_config(app: Any, host: str, port: int, log_level: str = "info") -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        server_header=False,
        # The hub judges the direct peer against auth.trusted_proxies itself; uvicorn's
        # X-Forwarded-For rewriting would let a client forge a trusted address.
        proxy_headers=False,
    )
