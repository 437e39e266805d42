"""/v1/files: OpenAI's Files API for batch input and the batches' output and error files.

An upload is checked line by line while it streams into the store (`hub/batches/upload.py`,
`hub/batches/lines.py`); only a file that passed is committed and gets its row, so a refused
upload leaves nothing. Files belong to the key's owner (the user, else the key itself).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import ColumnElement, Table, and_, delete, insert, or_, select

from hub.auth import Principal
from hub.batches.lines import LineChecker, LineError
from hub.batches.service import Batches
from hub.batches.tables import files
from hub.batches.upload import FormUpload
from hub.errors import ApiError

PURPOSES = ("batch", "batch_output")
LIFETIME_BOUNDS = (3600, 30 * 86400)  # OpenAI's bounds of expires_after.seconds
UPLOAD_SLACK = 64 * 1024  # form framing around the file in Content-Length


def owner_of(principal: Principal) -> str:
    if principal.user:
        return f"user:{principal.user}"
    if principal.key_id:
        return f"key:{principal.key_id}"
    raise ApiError(403, "files need an API key or a user", code="no_owner")


async def caller(request: Request) -> tuple[Principal, Batches]:
    services = request.app.state.services
    client = request.client.host if request.client else None
    principal = await services.auth.authenticate(request.headers, client, time.time())
    batches: Batches | None = services.batches
    if batches is None:
        raise ApiError(404, "batches are not enabled on this hub", code="batches_disabled")
    return principal, batches


def file_object(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "file",
        "bytes": row.bytes,
        "created_at": int(row.created_at),
        "filename": row.filename,
        "purpose": row.purpose,
        "status": "processed",
        "expires_at": int(row.expires_at) if row.expires_at is not None else None,
        "status_details": None,
    }


def expires_after(value: Any, param: str) -> float | None:
    """OpenAI's `{"anchor": "created_at", "seconds": N}`: N seconds, or None when absent."""
    if value is None:
        return None
    low, high = LIFETIME_BOUNDS
    seconds = value.get("seconds") if isinstance(value, dict) else None
    if isinstance(seconds, str) and seconds.isdigit():  # a form field's text
        seconds = int(seconds)
    if (
        not isinstance(value, dict) or value.get("anchor") != "created_at"
        or not isinstance(seconds, int) or isinstance(seconds, bool)
        or not low <= seconds <= high
    ):  # fmt: skip
        raise ApiError(400, f"{param} must be {{\"anchor\": \"created_at\", \"seconds\": N}}"
                       f" with N from {low} to {high}", param=param,
                       code="invalid_expires_after")  # fmt: skip
    return float(seconds)


def form_expires_after(fields: dict[str, str]) -> float | None:
    """expires_after from a multipart form: `expires_after[anchor]`, `expires_after[seconds]`
    (how the openai SDK sends the object)."""
    names = ("anchor", "seconds")
    if not any(f"expires_after[{name}]" in fields for name in names):
        return None
    value = {name: fields.get(f"expires_after[{name}]") for name in names}
    return expires_after(value, "expires_after")


def lifetime_end(created: float, lifetime: float | None, default: float | None) -> float | None:
    chosen = lifetime or default
    return created + chosen if chosen else None


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def _model_check(batches: Batches, principal: Principal) -> Any:
    def model_error(model: str) -> str | None:
        entry = batches.config.model(model)
        if entry is None or not principal.allows(model):
            return f"names model {model[:120]!r}, which does not exist or this key may not use"
        if not batches.runs_batches(entry.upstream):
            return f"names model {model!r}, which cannot run batches (not served by HPC)"
        return None

    return model_error


async def create_file(request: Request) -> dict[str, Any]:
    principal, batches = await caller(request)
    limits = batches.settings
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_file_bytes + UPLOAD_SLACK:
        raise _too_large(limits.max_file_bytes)
    checker = LineChecker(
        limits.max_line_bytes, limits.max_requests, _model_check(batches, principal)
    )
    file_id = new_id("file")
    async with batches.store.writer(file_id) as writer:

        def sink(data: bytes) -> None:
            if writer.size + len(data) > limits.max_file_bytes:
                raise _too_large(limits.max_file_bytes)
            try:
                checker.feed(data)
            except LineError as error:  # not a ValueError: the form parser would wrap it
                raise _bad_line(error) from None
            writer.write(data)

        form = FormUpload(request.headers.get("content-type", ""), sink)
        try:
            await form.consume(request.stream())
            summary = checker.finish() if form.filename is not None else None
        except LineError as error:
            raise _bad_line(error) from None
        row = _file_row(batches, principal, form, summary) | {"id": file_id, "bytes": writer.size}
        writer.commit()
    try:
        async with batches.engine.begin() as connection:
            await connection.execute(insert(files).values(**row))
    except BaseException:
        await batches.store.delete(file_id)
        raise
    return file_object(SimpleNamespace(**row))


def _file_row(batches: Batches, principal: Principal, form: FormUpload, summary: Any) -> Any:
    """The new file's row but its id and size; an ApiError for a form that is not one."""
    purpose = form.fields.get("purpose", "")
    if purpose != "batch":
        raise ApiError(400, f"purpose {purpose[:40]!r} is not supported; use batch",
                       param="purpose", code="invalid_purpose")  # fmt: skip
    if summary is None:
        raise ApiError(400, "the form has no file part", param="file", code="missing_file")
    lifetime, now = form_expires_after(form.fields), time.time()
    return {
        "owner": owner_of(principal), "key_id": principal.key_id,
        "user_name": principal.user, "group_name": principal.group, "purpose": purpose,
        "filename": form.filename, "lines": summary.lines, "model": summary.model,
        "url": summary.url, "created_at": now,
        "expires_at": lifetime_end(now, lifetime, batches.settings.file_lifetime),
    }  # fmt: skip


def _bad_line(error: LineError) -> ApiError:
    return ApiError(400, f"invalid batch file: {error}", param="file", code="invalid_batch_file")


def before(table: Table, cursor: Any, reverse: bool = False) -> ColumnElement[bool]:
    """Rows after `cursor` in (created_at, id) order, newest first (oldest with `reverse`):
    a page never skips or repeats rows made in the same second."""
    created, ident = table.c.created_at, table.c.id
    if reverse:
        return or_(
            created > cursor.created_at, and_(created == cursor.created_at, ident > cursor.id)
        )
    return or_(created < cursor.created_at, and_(created == cursor.created_at, ident < cursor.id))


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the file exceeds the limit of {limit} bytes", param="file",
                    code="file_too_large")  # fmt: skip


def unexpired(now: float) -> ColumnElement[bool]:
    """Files not expired by `now` (an expired one reads as gone before the sweep removed it)."""
    return or_(files.c.expires_at.is_(None), files.c.expires_at > now)


async def owned_file(batches: Batches, principal: Principal, file_id: str) -> Any:
    statement = select(files).where(
        files.c.id == file_id, files.c.owner == owner_of(principal), unexpired(time.time())
    )
    async with batches.engine.connect() as connection:
        row = (await connection.execute(statement)).first()
    if row is None:
        raise ApiError(404, f"no file {file_id[:80]!r}", param="file_id", code="file_not_found")
    return row


async def list_files(
    request: Request,
    purpose: str | None = None,
    limit: int = 10000,
    after: str | None = None,
    order: str = "desc",
) -> dict[str, Any]:
    principal, batches = await caller(request)
    statement = select(files).where(files.c.owner == owner_of(principal), unexpired(time.time()))
    if purpose:
        statement = statement.where(files.c.purpose == purpose)
    newest_first = order != "asc"
    key = (files.c.created_at.desc(), files.c.id.desc()) if newest_first else (
        files.c.created_at, files.c.id)  # fmt: skip
    if after:
        cursor = await owned_file(batches, principal, after)
        statement = statement.where(before(files, cursor, not newest_first))
    limit = max(1, min(limit, 10000))
    async with batches.engine.connect() as connection:
        rows = (await connection.execute(statement.order_by(*key).limit(limit + 1))).all()
    data = [file_object(row) for row in rows[:limit]]
    return {
        "object": "list", "data": data, "has_more": len(rows) > limit,
        "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None,
    }  # fmt: skip


async def get_file(file_id: str, request: Request) -> dict[str, Any]:
    principal, batches = await caller(request)
    return file_object(await owned_file(batches, principal, file_id))


async def delete_file(file_id: str, request: Request) -> dict[str, Any]:
    principal, batches = await caller(request)
    row = await owned_file(batches, principal, file_id)
    if await batches.file_in_use(row.id):
        raise ApiError(409, f"file {file_id} is the input of a batch still running",
                       code="file_in_use")  # fmt: skip
    async with batches.engine.begin() as connection:
        await connection.execute(delete(files).where(files.c.id == row.id))
    await batches.store.delete(row.id)
    return {"id": row.id, "object": "file", "deleted": True}


async def file_content(file_id: str, request: Request) -> StreamingResponse:
    principal, batches = await caller(request)
    row = await owned_file(batches, principal, file_id)
    size = await batches.store.size(row.id)  # a missing file is an error before the answer

    async def body() -> AsyncIterator[bytes]:
        async for chunk in batches.store.read(row.id):
            yield chunk

    headers = {"content-length": str(size)}
    return StreamingResponse(body(), media_type="application/jsonl", headers=headers)


def files_router() -> APIRouter:
    router = APIRouter(tags=["openai"])
    router.add_api_route("/v1/files", create_file, methods=["POST"])
    router.add_api_route("/v1/files", list_files, methods=["GET"])
    router.add_api_route("/v1/files/{file_id}", get_file, methods=["GET"])
    router.add_api_route("/v1/files/{file_id}", delete_file, methods=["DELETE"])
    router.add_api_route("/v1/files/{file_id}/content", file_content, methods=["GET"])
    return router
