"""The self-service API under /me: a logged-in user's own keys and usage (the /account/ page).

Only a person may use it: a login session (OpenID Connect) or a user named by the trusted
reverse proxy; never an API key (a leaked key must not mint more keys). What a user may
create is the operator's: `self_service` in the config (keys per user, their limits and
lifetime).
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from hub.auth import Principal, merge_limits
from hub.errors import ApiError
from hub.services import HubServices
from hub.usage.limits import window_bounds
from hub.usage.series import usage_series, user_totals


class OwnKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)


def _services(request: Request) -> HubServices:
    services: HubServices = request.app.state.services
    return services


async def _person(request: Request) -> Principal:
    client = request.client.host if request.client else None
    principal = await _services(request).auth.authenticate(request.headers, client, time.time())
    if principal.key_id is not None or principal.user is None:
        raise ApiError(403, "log in on the account page: API keys cannot manage keys")
    return principal


Services = Annotated[HubServices, Depends(_services)]
Person = Annotated[Principal, Depends(_person)]


def selfservice_router() -> APIRouter:
    router = APIRouter(prefix="/me", tags=["self-service"])
    _identity_routes(router)
    _key_routes(router)
    return router


def _identity_routes(router: APIRouter) -> None:
    @router.get("", summary="Who is logged in, their limits and what they may create")
    async def me(person: Person, services: Services) -> dict[str, Any]:
        auth, own = services.config.auth, services.config.self_service
        return {
            "user": person.user,
            "group": person.group,
            "admin": person.admin,
            "user_limits": auth.user_limits.model_dump(exclude_none=True),
            "key_limits": merge_limits(own.key_limits, auth.default_key_limits).model_dump(
                exclude_none=True
            ),
            "keys_per_user": own.keys_per_user,
            "key_lifetime_days": own.key_lifetime_days,
            "models": [model.id for model in services.config.models],
        }

    @router.get("/usage", summary="My usage today and this month, by model and by day")
    async def my_usage(person: Person, services: Services) -> dict[str, Any]:
        assert person.user is not None
        now = time.time()
        day, _ = window_bounds("day", now)
        month, _ = window_bounds("month", now)
        with services.database.guard("usage of a user"):
            today = await user_totals(services.engine, person.user, day, now + 1)
            this_month = await user_totals(services.engine, person.user, month, now + 1)
            daily = await usage_series(
                services.engine, since=month, until=now + 1, by="model", bucket="day",
                user=person.user,
            )  # fmt: skip
        return {
            "today": _sum(today),
            "month": _sum(this_month),
            "by_model": this_month,
            "daily": daily,
            "day_start": day,
            "month_start": month,
            "user_limits": services.config.auth.user_limits.model_dump(exclude_none=True),
        }


def _sum(per_model: dict[str, dict[str, int]]) -> dict[str, int]:
    totals = {"requests": 0, "tokens": 0, "errors": 0}
    for figures in per_model.values():
        for name in totals:
            totals[name] += figures[name]
    return totals


def _key_routes(router: APIRouter) -> None:
    @router.get("/keys", summary="My API keys (never their secrets)")
    async def my_keys(person: Person, services: Services) -> list[dict[str, Any]]:
        assert person.user is not None
        return [record.public() for record in await services.keys.list_owned(person.user)]

    @router.post("/keys", status_code=201, summary="Create an API key for me")
    async def create_my_key(
        body: OwnKeyCreate, person: Person, services: Services
    ) -> dict[str, Any]:
        assert person.user is not None
        own = services.config.self_service
        now = time.time()
        owned = await services.keys.list_owned(person.user)
        active = [record for record in owned if record.problem(now) is None]
        if len(active) >= own.keys_per_user:
            raise ApiError(
                403, f"you have {len(active)} active keys, the most allowed is "
                f"{own.keys_per_user}: revoke one first", code="too_many_keys",
            )  # fmt: skip
        lifetime = own.key_lifetime_days
        record, new = await services.keys.create(
            name=body.name, now=now, owner=person.user, group=person.group,
            limits=own.key_limits, expires_at=now + lifetime * 86400 if lifetime else None,
        )  # fmt: skip
        return {"key": record.public(), "secret": new.secret}

    @router.delete("/keys/{key_id}", summary="Revoke one of my keys")
    async def revoke_my_key(key_id: str, person: Person, services: Services) -> dict[str, Any]:
        assert person.user is not None
        if not await services.keys.revoke(key_id, time.time(), owner=person.user):
            raise ApiError(404, f"you have no active key {key_id}", code="key_not_found")
        services.key_cache.forget()
        return {"id": key_id, "revoked": True}
