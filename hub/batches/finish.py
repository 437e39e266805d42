"""A batch whose job ended: its output pulled from the agent, split, accounted, recorded.

The agent's output (vLLM's run-batch lines) streams down line by line: answers with status
200 go to the output file, the rest to the error file; a failed job's requests that have
no line at all get an error line each. Every answered request is one usage row, endpoint
`batch:<url>`, on no rate-limit counter (batches do not use the interactive limits).

The copy runs under the batch's lease (`hub/batches/lease.py`): one replica copies, the
others skip the batch while the lease is held, and a replica that stops mid-copy leaves a
lease that expires, after which another copies it all again. Store files are invisible
until committed, and the batch's last status and its file rows are one transaction, taken
only while the lease is still this replica's: a half copy is never visible.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import insert, update
from sqlalchemy.ext.asyncio import AsyncEngine

from hub.batch_config import BatchesConfig
from hub.batches.file_store import FileStore, StoreWriter
from hub.batches.hop import AgentBatches
from hub.batches.lease import LeaseLost, Leases
from hub.batches.lines import (
    custom_id_of,
    final_status,
    missing_line,
    read_output_line,
    renamed_line,
)
from hub.batches.tables import batches, files
from hub.config import HubConfig
from hub.usage.accounting import UsageRecorder
from hub.usage.records import UsageRecord

log = logging.getLogger(__name__)
MAX_OUTPUT_LINE = 64 * 1024 * 1024  # one answer line held at most (an embedding is large)
FREE = {"lease_owner": None, "lease_until": None}  # the lease released with a change
CLAIMED = ("in_progress", "cancelling", "finalizing")


class Keeper(Protocol):
    """What finishing needs of `hub.batches.service.Batches`."""

    config: HubConfig
    settings: BatchesConfig
    engine: AsyncEngine
    recorder: UsageRecorder
    store: FileStore
    leases: Leases

    def agent(self, upstream: str, site: int) -> AgentBatches: ...

    async def change(
        self, batch_id: str, expected: tuple[str, ...], held: bool = False, **values: Any
    ) -> bool: ...


@dataclass
class Tally:
    completed: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    done: set[str] = field(default_factory=set)


async def lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    carry = bytearray()
    async for chunk in chunks:
        carry += chunk
        while (end := carry.find(b"\n")) >= 0:
            line = bytes(carry[:end])
            del carry[: end + 1]
            if line.strip():
                yield line
        if len(carry) > MAX_OUTPUT_LINE:
            raise ValueError("an output line is too long")
    if bytes(carry).strip():
        yield bytes(carry)


async def finish(keeper: Keeper, row: Any, state: dict[str, Any], now: float) -> None:
    """Pull, split and record the output, then give the batch its last status: by one
    replica at a time (the others return at once)."""
    if not await keeper.leases.take(row.id, CLAIMED, now):
        return
    try:
        async with keeper.leases.held(row.id):
            await _finish(keeper, row, state, now)
    except LeaseLost as error:
        log.warning("%s", error)
    except Exception:  # the agent or the database failed: the next poll tries again
        with contextlib.suppress(Exception):
            await keeper.leases.release(row.id)
        raise


async def _finish(keeper: Keeper, row: Any, state: dict[str, Any], now: float) -> None:
    # A cancelled batch stays `cancelling` until `cancelled` (OpenAI's statuses: `finalizing`
    # is for a finished one), which also keeps the cancel if this hub stops half-way.
    interim = "cancelling" if row.status == "cancelling" else "finalizing"
    if not await keeper.change(row.id, CLAIMED, True, status=interim, finalizing_at=now):
        return
    final = final_status(
        str(state.get("state")), row.status == "cancelling",
        bool(row.expires_at) and now > row.expires_at,
    )  # fmt: skip
    message = str(state.get("message") or "the batch job failed")
    tally, kept = await _collect(keeper, row, final == "failed", message, now)
    output_id = next((file_id for _, file_id, name in kept if name == "output"), None)
    error_id = next((file_id for _, file_id, name in kept if name == "errors"), None)
    values: dict[str, Any] = {
        "status": final, f"{final}_at": now, "output_file_id": output_id,
        "error_file_id": error_id, "completed": tally.completed, "failed": tally.failed,
        "prompt_tokens": tally.prompt_tokens, "completion_tokens": tally.completion_tokens,
        "price_factor": keeper.settings.price_factor, "message": message, **FREE,
    }  # fmt: skip
    if final == "failed":
        values["errors"] = [{"code": "batch_failed", "message": message, "line": None}]
    if final == "expired" or final == "cancelled":
        values["total"] = max(row.total, tally.completed + tally.failed)
    if not await _record(keeper, row, interim, values, kept, now):
        for _size, file_id, _name in kept:  # another replica took over: its copy counts
            await keeper.store.delete(file_id)
        return
    log.info("batch %s %s: %d answered, %d failed", row.id, final, tally.completed, tally.failed)
    await keeper.agent(row.upstream, row.site).forget(row.id)


async def _collect(
    keeper: Keeper, row: Any, failed: bool, message: str, now: float
) -> tuple[Tally, list[tuple[int, str, str]]]:
    """The output and error files written and committed to the store (no rows yet):
    (size, file id, name) of each that is not empty."""
    store, tally = keeper.store, Tally()
    output_id, error_id = f"file-{secrets.token_hex(12)}", f"file-{secrets.token_hex(12)}"
    model = keeper.config.model(row.model)
    target = model.target if model is not None else row.model
    agent = keeper.agent(row.upstream, row.site)
    async with store.writer(output_id) as good, store.writer(error_id) as bad:
        async with agent.output(row.id) as chunks:
            if chunks is not None:
                async for line in lines(chunks):
                    _take(keeper, row, line, (good, bad), tally, (target, now))
        if failed:
            await _missing(keeper, row, bad, tally, message)
        for writer in (good, bad):
            if writer.size:
                writer.commit()
    named = [(good.size, output_id, "output"), (bad.size, error_id, "errors")]
    return tally, [entry for entry in named if entry[0]]


def _take(
    keeper: Keeper,
    row: Any,
    line: bytes,
    writers: tuple[StoreWriter, StoreWriter],
    tally: Tally,
    context: tuple[str, float],
) -> None:
    target, now = context
    verdict = read_output_line(line)
    if verdict is None or verdict.custom_id in tally.done:
        return  # not an answer line (or a repeated one): nothing to give the client
    tally.done.add(verdict.custom_id)
    if target != row.model:
        line = renamed_line(line, ("response", "body", "model"), target, row.model)
    (writers[0] if verdict.ok else writers[1]).write(line + b"\n")
    if verdict.ok:
        tally.completed += 1
    else:
        tally.failed += 1
    tally.prompt_tokens += verdict.prompt_tokens
    tally.completion_tokens += verdict.completion_tokens
    number = len(tally.done)
    keeper.recorder.record(
        UsageRecord(
            request_id=f"{row.id}:{number}",
            key_id=row.key_id,
            user_name=row.user_name,
            group_name=row.group_name,
            model=row.model,
            upstream=row.upstream,
            endpoint=f"batch:{row.endpoint}",
            status=200 if verdict.ok else 500,
            stream=False,
            prompt_tokens=verdict.prompt_tokens,
            completion_tokens=verdict.completion_tokens,
            latency_ms=0.0,
            ttft_ms=None,
            started_at=row.in_progress_at or now,
            finished_at=now,
        )
    )


async def _missing(keeper: Keeper, row: Any, bad: StoreWriter, tally: Tally, message: str) -> None:
    """An error line for every input request the failed job left without an answer."""
    async for line in lines(keeper.store.read(row.input_file_id)):
        custom_id = custom_id_of(line)
        if custom_id is not None and custom_id not in tally.done:
            tally.done.add(custom_id)
            tally.failed += 1
            bad.write(missing_line(custom_id, row.id, message) + b"\n")


async def _record(
    keeper: Keeper,
    row: Any,
    interim: str,
    values: dict[str, Any],
    kept: list[tuple[int, str, str]],
    now: float,
) -> bool:
    """The batch's last status and its files' rows in one transaction, only while this
    replica still holds the lease; False (nothing written) when it does not."""
    lifetime = row.output_expires_after or keeper.settings.file_lifetime
    held = update(batches).where(
        batches.c.id == row.id, batches.c.status == interim,
        batches.c.lease_owner == keeper.leases.owner,
    )  # fmt: skip
    async with keeper.engine.begin() as connection:
        if (await connection.execute(held.values(**values))).rowcount != 1:
            return False
        for size, file_id, name in kept:
            entry = {
                "id": file_id, "owner": row.owner, "key_id": row.key_id,
                "user_name": row.user_name, "group_name": row.group_name,
                "purpose": "batch_output", "filename": f"{row.id}_{name}.jsonl", "bytes": size,
                "lines": 0, "model": row.model, "url": row.endpoint, "created_at": now,
                "expires_at": now + lifetime if lifetime else None,
            }  # fmt: skip
            await connection.execute(insert(files).values(**entry))
    return True
