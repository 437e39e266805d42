"""The FastAPI application: OpenAI-compatible routes, health, metrics and the chat page."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from hub.config import ModelConfig
from hub.endpoints import DEFAULT_ENDPOINTS, ROUTES
from hub.errors import ApiError, failure_answer
from hub.proxy.anthropic_api import MESSAGES, anthropic_answer
from hub.proxy.openapi import add_proxied_paths
from hub.proxy.serve import serve_proxied
from hub.services import HubServices, check_environment, open_services
from hub.upstreams.base import ModelState

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"


class HubApp(FastAPI):
    """FastAPI, but the proxied routes are not FastAPI's: `serve_proxied` answers them before
    its middleware, routing and dependency machinery (~0.1 ms per request), the one way into
    the proxy. They are described in the OpenAPI document all the same."""

    proxied_paths: dict[str, str] = {}  # path -> route (hub.endpoints.ROUTES), set by create_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path, root = scope["path"], scope.get("root_path", "")
            if root and path.startswith(root):  # mounted under a prefix (a --root-path)
                path = path[len(root) :]
            endpoint = self.proxied_paths.get(path)
            if endpoint is not None:
                if scope["method"] == "POST":
                    await serve_proxied(self.state.services, endpoint, scope, receive, send)
                elif endpoint == MESSAGES:
                    await _NOT_ALLOWED_ANTHROPIC(scope, receive, send)
                else:
                    await _NOT_ALLOWED(scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            schema = super().openapi()
            add_proxied_paths(schema, ROUTES)
        return self.openapi_schema or {}


_NOT_ALLOWED = ApiError(405, "method not allowed", headers={"allow": "POST"}).response()
_NOT_ALLOWED_ANTHROPIC = anthropic_answer(
    ApiError(405, "method not allowed", headers={"allow": "POST"}).response()
)


def services_of(request: Request) -> HubServices:
    services: HubServices = request.app.state.services
    return services


async def _failure(_request: Request, error: Exception) -> Response:
    return failure_answer(error)


async def _http_error(_request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    message = {404: "no such endpoint", 405: "method not allowed"}.get(
        error.status_code, str(error.detail)
    )
    return failure_answer(ApiError(error.status_code, message, headers=error.headers))


async def _validation_error(_request: Request, error: Exception) -> Response:
    assert isinstance(error, RequestValidationError)
    first = error.errors()[0] if error.errors() else {}
    where = ".".join(str(part) for part in first.get("loc", ()))
    message = f"{where}: {first.get('msg', 'invalid request')}"
    return failure_answer(ApiError(400, message, code="invalid_request"))


def model_entry(
    services: HubServices, model: ModelConfig, states: dict[str, Any]
) -> dict[str, Any]:
    state = states.get(model.upstream, {}).get(model.target)
    default = services.upstreams[model.upstream].default_status
    entry: dict[str, Any] = {
        "id": model.id,
        "object": "model",
        "created": model.created,
        "owned_by": model.owned_by,
        "name": model.name or (state.name if state is not None else None) or model.id,
        "input": model.input or list((state.input if state else None) or ("text",)),
        "output": model.output or list((state.output if state else None) or ("text",)),
        "endpoints": endpoints_of(model, state),
        "status": state.status if state is not None else default,
        "demand": state.demand if state is not None else 0.0,
        "queued": state.queued if state is not None else 0,
        "oldest_wait": state.oldest_wait if state is not None else 0.0,
    }
    if state is not None and state.status == "loading" and state.predicted_wait is not None:
        entry["predicted_wait"] = state.predicted_wait  # the agents' estimate, in seconds
    return entry


def endpoints_of(model: ModelConfig, state: ModelState | None) -> list[str]:
    """What a model serves: the hub's override, else what its agent says, else the OpenAI
    endpoints a provider is taken to serve."""
    if model.endpoints is not None:
        return list(model.endpoints)
    if state is not None and state.endpoints is not None:
        return list(state.endpoints)
    return list(DEFAULT_ENDPOINTS)


def _add_openai_routes(app: FastAPI) -> None:
    async def list_models(request: Request) -> dict[str, Any]:
        services = services_of(request)
        client = request.client.host if request.client else None
        principal = await services.auth.authenticate(request.headers, client, time.time())
        models, states = await services.catalog()
        data = [model_entry(services, m, states) for m in models if principal.allows(m.id)]
        return {"object": "list", "data": data}

    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        listing = await list_models(request)
        for entry in listing["data"]:
            if entry["id"] == model_id:
                return dict(entry)
        raise ApiError(404, f"the model `{model_id}` does not exist", code="model_not_found")

    app.add_api_route("/v1/models", list_models, methods=["GET"], tags=["openai"])
    app.add_api_route("/v1/models/{model_id:path}", get_model, methods=["GET"], tags=["openai"])


def _add_operations_routes(app: FastAPI) -> None:
    async def health(request: Request) -> Response:
        status, body = services_of(request).health()  # 503 + reason: database, usage writer
        return JSONResponse(body, status_code=status)

    async def metrics(request: Request) -> Response:
        await services_of(request).auth.authenticate_metrics(request.headers, time.time())
        body = services_of(request).metrics.exposition()
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    app.add_api_route("/health", health, methods=["GET"], tags=["operations"])
    app.add_api_route("/metrics", metrics, methods=["GET"], tags=["operations"])
    if STATIC.is_dir():
        app.mount("/chat", StaticFiles(directory=STATIC, html=True), name="chat")

        async def root() -> RedirectResponse:
            return RedirectResponse("/chat/")

        app.add_api_route("/", root, methods=["GET"], include_in_schema=False)


def create_app(
    config: Any, environ: Mapping[str, str] | None = None, *, migrate: bool = True
) -> HubApp:
    """The hub app for a validated HubConfig; services open and close with its lifespan.
    `migrate=False` when the caller brought the schema up to date already (`saia hub serve`
    does, to report an unreachable database in one line before uvicorn starts)."""
    env = dict(os.environ if environ is None else environ)
    check_environment(config, env)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_services(config, env, migrate=migrate) as services:
            app.state.services = services
            yield

    app = HubApp(title="saia hub", version="1", lifespan=lifespan, **config.docs_urls())
    app.proxied_paths = {path: route for route, path in ROUTES.items()}
    app.add_exception_handler(ApiError, _failure)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _failure)
    _add_openai_routes(app)
    _add_operations_routes(app)
    from hub.admin import admin_router
    from hub.web.pages import add_pages

    app.include_router(admin_router())
    from hub.batches.api import batches_router
    from hub.batches.files import files_router

    app.include_router(files_router())  # /v1/files and /v1/batches (issue 14)
    app.include_router(batches_router())
    add_pages(app, config, env)  # login, self-service, dashboard
    return app
