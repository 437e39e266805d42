"""Admin REST API under /admin: keys, limits and usage (mirrors `saia hub keys|usage`).

Protected by the admin token (environment variable named in the config) or a key created
with `--admin`.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator

from hub.auth import Principal
from hub.config import LimitsConfig, ModelConfig
from hub.errors import ApiError
from hub.services import HubServices
from hub.upstreams.base import ModelState
from hub.usage.accounting import GroupBy, parse_moment, usage_summary
from hub.usage.budgets import group_budgets
from hub.usage.series import Bucket, SeriesBy, usage_series


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    owner: str | None = Field(None, max_length=200)
    group: str | None = Field(None, max_length=200)
    admin: bool = False
    allowed_models: list[str] | None = None
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    expires_in_days: float | None = Field(None, gt=0)

    @field_validator("allowed_models")
    @classmethod
    def _some_models(cls, value: list[str] | None) -> list[str] | None:
        # [] would be a key that may use no model at all: surely a mistake (null = all).
        if value is not None and not value:
            raise ValueError("an empty list allows no model; leave it out (null) to allow all")
        return value


class KeyCreated(BaseModel):
    key: dict[str, Any]
    secret: str = Field(description="the API key; shown only once")


def _services(request: Request) -> HubServices:
    services: HubServices = request.app.state.services
    return services


async def _admin(request: Request) -> Principal:
    return await _services(request).auth.authenticate_admin(request.headers, time.time())


Services = Annotated[HubServices, Depends(_services)]


def admin_router() -> APIRouter:
    router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(_admin)])
    _key_routes(router)
    _limit_and_usage_routes(router)
    _dashboard_routes(router)
    return router


def _key_routes(router: APIRouter) -> None:
    @router.get("/keys", summary="List API keys (never their secrets)")
    async def list_keys(services: Services) -> list[dict[str, Any]]:
        return [record.public() for record in await services.keys.list()]

    @router.post("/keys", status_code=201, summary="Create an API key")
    async def create_key(body: KeyCreate, services: Services) -> KeyCreated:
        now = time.time()
        expires = now + body.expires_in_days * 86400 if body.expires_in_days else None
        record, new = await services.keys.create(
            name=body.name,
            now=now,
            owner=body.owner,
            group=body.group,
            admin=body.admin,
            allowed_models=body.allowed_models,
            limits=body.limits,
            expires_at=expires,
        )
        return KeyCreated(key=record.public(), secret=new.secret)

    @router.get("/keys/{key_id}", summary="Show one API key")
    async def show_key(key_id: str, services: Services) -> dict[str, Any]:
        record = await services.keys.get(key_id)
        if record is None:
            raise ApiError(404, f"no key {key_id}", code="key_not_found")
        return record.public()

    @router.delete("/keys/{key_id}", summary="Revoke an API key (effective within the cache TTL)")
    async def revoke_key(key_id: str, services: Services) -> dict[str, Any]:
        if not await services.keys.revoke(key_id, time.time()):
            raise ApiError(404, f"no active key {key_id}", code="key_not_found")
        services.key_cache.forget()
        return {"id": key_id, "revoked": True}


def _limit_and_usage_routes(router: APIRouter) -> None:
    @router.put("/keys/{key_id}/limits", summary="Replace the limits of an API key")
    async def set_limits(key_id: str, limits: LimitsConfig, services: Services) -> dict[str, Any]:
        if not await services.keys.set_limits(key_id, limits):
            raise ApiError(404, f"no key {key_id}", code="key_not_found")
        services.key_cache.forget()
        return {"id": key_id, "limits": limits.model_dump(exclude_none=True)}

    @router.get("/usage", summary="Usage summary since a date, grouped")
    async def usage(
        services: Services,
        since: Annotated[str, Query(description="e.g. 2026-11-01 (UTC)")],
        by: GroupBy = "user",
        until: str | None = None,
    ) -> list[dict[str, Any]]:
        try:
            start = parse_moment(since)
            end = parse_moment(until) if until else None
        except ValueError as error:
            raise ApiError(400, str(error), param="since") from None
        with services.database.guard("usage summary"):  # an outage: 503, not a traceback
            return await usage_summary(services.engine, since=start, until=end, by=by)

    @router.get("/usage/groups", summary="Each group's use of its current windows vs its budget")
    async def group_usage(services: Services) -> list[dict[str, Any]]:
        budgets = services.config.auth.group_limits
        with services.database.guard("group budgets"):
            return await group_budgets(services.engine, budgets, time.time())


def _dashboard_routes(router: APIRouter) -> None:
    @router.get("/usage/series", summary="Usage over time by model, group or user")
    async def series(
        services: Services,
        since: Annotated[str, Query(description="e.g. 2026-11-01 (UTC)")],
        by: SeriesBy = "model",
        bucket: Bucket = "hour",
        until: str | None = None,
    ) -> list[dict[str, Any]]:
        try:
            start = parse_moment(since)
            end = parse_moment(until) if until else time.time() + 1
        except ValueError as error:
            raise ApiError(400, str(error), param="since") from None
        with services.database.guard("usage series"):
            try:
                return await usage_series(
                    services.engine, since=start, until=end, by=by, bucket=bucket
                )
            except ValueError as error:
                raise ApiError(400, str(error), param="bucket") from None

    @router.get("/services", summary="Each model: its upstream's state, demand, hub in flight")
    async def model_services(services: Services) -> list[dict[str, Any]]:
        models = services.config.models
        states = await services.model_states({model.upstream for model in models})
        return [_service_entry(services, model, states) for model in models]


def _service_entry(
    services: HubServices, model: ModelConfig, states: dict[str, dict[str, ModelState]]
) -> dict[str, Any]:
    """What the hub knows of one model: its upstream's state and the hub's own in flight."""
    state = states.get(model.upstream, {}).get(model.target)
    labels = {"model": model.id, "upstream": model.upstream}
    in_flight = services.metrics.registry.get_sample_value("saia_hub_in_flight", labels)
    return {
        "id": model.id,
        "upstream": model.upstream,
        "status": state.status if state else services.upstreams[model.upstream].default_status,
        "demand": state.demand if state else 0.0,
        "in_flight": int(in_flight or 0),
        # From the agents' listings (0 for providers): ready instances, jobs starting, and
        # the agents' queue (requests waiting for a slot, the longest wait in seconds).
        "instances": state.instances if state else 0,
        "starting": state.starting if state else 0,
        "queued": state.queued if state else 0,
        "oldest_wait": state.oldest_wait if state else 0.0,
    }
