"""A new batch's input sent to its agent in pieces, then its job submitted.

Runs as a task of `hub.batches.service.Batches` (`launch`), so POST /v1/batches answers at
once with `validating`; the batch becomes `in_progress` once the agent submitted the job,
or `failed` with the agent's reason. It runs under the batch's lease (`hub/batches/lease.py`):
a hub stopped meanwhile leaves it `validating` with a lease that expires, and another
replica's poller sends it again. The agent knows a batch by its id, so a batch it has
already (the stopped hub got as far as the submit) is taken as it is, never run twice.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from hub.batches.finish import FREE, Keeper, lines
from hub.batches.hop import AgentBatchError
from hub.batches.lines import renamed_line


async def _renamed(chunks: AsyncIterator[bytes], old: str, new: str) -> AsyncIterator[bytes]:
    """The input with each line's body.model renamed to the upstream's name."""
    async for line in lines(chunks):
        yield renamed_line(line, ("body", "model"), old, new) + b"\n"


async def start_batch(keeper: Keeper, row: dict[str, Any], target: str, expires_at: float) -> None:
    """Send and submit on the first site of the upstream that can be reached (in order)."""
    batch_id, failures = row["id"], []
    upstream = keeper.config.upstreams[row["upstream"]]
    for site in range(len(getattr(upstream, "sites", [None]))):
        try:
            answer = await _send(keeper, row, site, target, expires_at)
        except AgentBatchError as error:
            failures.append(str(error))
            if error.status == 503:  # this site cannot be reached: the next one may
                continue
            break
        await keeper.change(batch_id, ("validating",), True, status="in_progress", site=site,
                            in_progress_at=time.time(), expires_at=expires_at,
                            job_id=answer.get("job_id"), **FREE)  # fmt: skip
        return
    message = "; ".join(failures)
    errors = [{"code": "agent_refused", "message": message, "line": None}]
    await keeper.change(batch_id, ("validating",), True, status="failed", failed_at=time.time(),
                        errors=errors, message=message, **FREE)  # fmt: skip


async def _send(
    keeper: Keeper, row: dict[str, Any], site: int, target: str, expires_at: float
) -> dict[str, Any]:
    agent = keeper.agent(row["upstream"], site)
    try:  # a replica that stopped may have got as far as the submit: the same job then
        return await agent.status(row["id"])
    except AgentBatchError as error:
        if error.status != 404:
            raise
    chunks = keeper.store.read(row["input_file_id"])
    if target != row["model"]:
        chunks = _renamed(chunks, row["model"], target)
    spec = {
        "service": target, "requests": row["total"], "user": row["user_name"],
        "group": row["group_name"], "window_s": expires_at - row["created_at"],
        "endpoint": row["endpoint"],
    }  # fmt: skip
    size = await agent.send_input(row["id"], chunks, keeper.settings.transfer_chunk_bytes)
    return await agent.submit(row["id"], spec | {"bytes": size})
