"""/v1/batches: OpenAI's Batches API, run by the agent as a Slurm job of its own.

Creating a batch answers `validating` and sends its input file to the model's agent in
pieces over the hop in the background (`hub/batches/start.py`): `in_progress` once the agent
submitted the job, `failed` with the agent's reason otherwise; the poller
(`hub/batches/service.py`) follows it from there. Batches
belong to the key's owner like files, and use no interactive rate limit.
"""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import APIRouter, Request
from sqlalchemy import insert, select

from hub.auth import Principal
from hub.batches.files import before, caller, expires_after, new_id, owned_file, owner_of
from hub.batches.hop import AgentBatchError
from hub.batches.service import Batches
from hub.batches.tables import batches
from hub.errors import ApiError

_TIMES = ("created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at",
          "failed_at", "expired_at", "cancelling_at", "cancelled_at")  # fmt: skip
MAX_METADATA = 16


def batch_object(row: Any) -> dict[str, Any]:
    errors = {"object": "list", "data": row.errors} if row.errors else None
    entry: dict[str, Any] = {
        "id": row.id, "object": "batch", "endpoint": row.endpoint, "model": row.model,
        "errors": errors, "input_file_id": row.input_file_id,
        "completion_window": row.completion_window, "status": row.status,
        "output_file_id": row.output_file_id, "error_file_id": row.error_file_id,
        "request_counts": {"total": row.total, "completed": row.completed, "failed": row.failed},
        "metadata": row.meta,
    }  # fmt: skip
    for name in _TIMES:
        value = getattr(row, name)
        entry[name] = int(value) if value is not None else None
    if row.status in ("completed", "failed", "cancelled", "expired"):
        entry["usage"] = {
            "input_tokens": row.prompt_tokens, "output_tokens": row.completion_tokens,
            "total_tokens": row.prompt_tokens + row.completion_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        }  # fmt: skip
    return entry


async def owned_batch(keeper: Batches, principal: Principal, batch_id: str) -> Any:
    owner = owner_of(principal)
    statement = select(batches).where(batches.c.id == batch_id, batches.c.owner == owner)
    async with keeper.engine.connect() as connection:
        row = (await connection.execute(statement)).first()
    if row is None:
        raise ApiError(404, f"no batch {batch_id[:80]!r}", param="batch_id", code="batch_not_found")
    return row


async def _request_json(request: Request) -> dict[str, Any]:
    body = await request.body()
    if len(body) > 64 * 1024:
        raise ApiError(413, "the request body is too large", code="request_too_large")
    try:
        data = json.loads(body)
    except ValueError:
        raise ApiError(400, "the body is not JSON", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body is not a JSON object", code="invalid_json")
    return data


def _checked_request(keeper: Batches, data: dict[str, Any]) -> tuple[str, str, Any]:
    window = data.get("completion_window")
    windows = keeper.settings.completion_windows
    if window not in windows:
        allowed = ", ".join(windows)
        raise ApiError(400, f"completion_window must be one of: {allowed}",
                       param="completion_window", code="invalid_completion_window")  # fmt: skip
    metadata = data.get("metadata")
    if metadata is not None and (
        not isinstance(metadata, dict) or len(metadata) > MAX_METADATA
        or not all(isinstance(v, str) and len(v) <= 512 for v in metadata.values())
    ):  # fmt: skip
        raise ApiError(400, "metadata: at most 16 string values", param="metadata",
                       code="invalid_metadata")  # fmt: skip
    file_id = data.get("input_file_id")
    if not isinstance(file_id, str):
        raise ApiError(400, "input_file_id is required", param="input_file_id",
                       code="invalid_request")  # fmt: skip
    return file_id, str(window), metadata


async def create_batch(request: Request) -> dict[str, Any]:
    principal, keeper = await caller(request)
    data = await _request_json(request)
    file_id, window, metadata = _checked_request(keeper, data)
    output_lifetime = expires_after(data.get("output_expires_after"), "output_expires_after")
    source = await owned_file(keeper, principal, file_id)
    if source.purpose != "batch":
        raise ApiError(400, f"file {file_id} is not a batch input file", param="input_file_id",
                       code="invalid_input_file")  # fmt: skip
    if data.get("endpoint") != source.url:
        raise ApiError(400, f"endpoint must be {source.url}, the url of every line of the file",
                       param="endpoint", code="invalid_endpoint")  # fmt: skip
    model = keeper.config.model(source.model)
    if model is None or not principal.allows(model.id) or not keeper.runs_batches(model.upstream):
        raise ApiError(403, f"this key may not run batches of model {source.model!r}",
                       param="input_file_id", code="model_not_allowed")  # fmt: skip
    now = time.time()
    row = {
        "id": new_id("batch"), "owner": owner_of(principal), "key_id": principal.key_id,
        "user_name": principal.user, "group_name": principal.group, "endpoint": source.url,
        "model": model.id, "upstream": model.upstream, "site": 0, "input_file_id": source.id,
        "completion_window": window, "status": "validating", "created_at": now,
        "total": source.lines, "completed": 0, "failed": 0, "prompt_tokens": 0,
        "completion_tokens": 0, "price_factor": keeper.settings.price_factor, "meta": metadata,
        "output_expires_after": output_lifetime,
        # This replica sends the input: held from the start, so no poller sends it too.
        "lease_owner": keeper.leases.owner, "lease_until": now + keeper.leases.ttl,
    }  # fmt: skip
    async with keeper.engine.begin() as connection:
        await connection.execute(insert(batches).values(**row))
    # The input goes to the agent in the background (OpenAI answers `validating` too).
    keeper.launch(row, model.target, now + keeper.settings.completion_windows[window])
    return batch_object(await keeper.row(row["id"]))


async def get_batch(batch_id: str, request: Request) -> dict[str, Any]:
    principal, keeper = await caller(request)
    return batch_object(await owned_batch(keeper, principal, batch_id))


async def list_batches(
    request: Request, limit: int = 20, after: str | None = None
) -> dict[str, Any]:
    principal, keeper = await caller(request)
    statement = select(batches).where(batches.c.owner == owner_of(principal))
    if after:
        cursor = await owned_batch(keeper, principal, after)
        statement = statement.where(before(batches, cursor))
    limit = max(1, min(limit, 100))
    order = (batches.c.created_at.desc(), batches.c.id.desc())
    async with keeper.engine.connect() as connection:
        rows = (await connection.execute(statement.order_by(*order).limit(limit + 1))).all()
    data = [batch_object(row) for row in rows[:limit]]
    return {
        "object": "list", "data": data, "has_more": len(rows) > limit,
        "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None,
    }  # fmt: skip


async def cancel_batch(batch_id: str, request: Request) -> dict[str, Any]:
    principal, keeper = await caller(request)
    row = await owned_batch(keeper, principal, batch_id)
    if row.status not in ("validating", "in_progress", "cancelling"):
        raise ApiError(409, f"batch {batch_id} is already {row.status}", code="batch_not_active")
    await cancel_row(keeper, row)
    return batch_object(await keeper.row(row.id))


async def cancel_row(keeper: Batches, row: Any) -> None:
    """Mark the batch `cancelling` and ask its agent to stop the job (the poller finishes)."""
    await keeper.change(row.id, ("validating", "in_progress"), status="cancelling",
                        cancelling_at=time.time())  # fmt: skip
    try:
        await keeper.agent(row.upstream, row.site).cancel(row.id)
    except AgentBatchError as error:  # the poller sees the job end or asks again
        await keeper.change(row.id, ("cancelling",), message=f"cancel pending: {error}")
    keeper.wake.set()


def batches_router() -> APIRouter:
    router = APIRouter(tags=["openai"])
    router.add_api_route("/v1/batches", create_batch, methods=["POST"])
    router.add_api_route("/v1/batches", list_batches, methods=["GET"])
    router.add_api_route("/v1/batches/{batch_id}", get_batch, methods=["GET"])
    router.add_api_route("/v1/batches/{batch_id}/cancel", cancel_batch, methods=["POST"])
    return router
