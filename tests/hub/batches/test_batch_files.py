"""/v1/files and /v1/batches on the real hub (uvicorn) without an agent: uploads checked line
by line with the unchanged `openai` SDK, each bad input one OpenAI error naming its line,
nothing stored half-way; owners see only their own files."""

from __future__ import annotations

import asyncio
import io
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
from sqlalchemy import func, select

from hub.batches.tables import batches, files
from hub.config import parse_config
from tests.hub.helpers import RunningHub, running_hub

MODEL, SECRET = "batchy", "other-model"


def request_line(index: int, model: str = MODEL, **extra: Any) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": f"question {index}"}]}
    return {"custom_id": f"req-{index}", "method": "POST", "url": "/v1/chat/completions",
            "body": body, **extra}  # fmt: skip


def jsonl(lines: list[Any]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


@pytest.fixture
async def hub(tmp_path: Path, database_url: str) -> AsyncIterator[RunningHub]:
    site = {"socket": str(tmp_path / "no-agent.sock")}
    config = parse_config({
        "data_dir": str(tmp_path / "hub-data"), "database_url": database_url,
        "upstreams": {"cluster": {"kind": "hpc", "sites": [site], "timeouts": {"connect": 0.3}},
                      "cloud": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}},
        "models": [{"id": MODEL, "upstream": "cluster"}, {"id": SECRET, "upstream": "cluster"},
                   {"id": "cloud-model", "upstream": "cloud"}],
        "batches": {"max_file_bytes": 64 * 1024, "max_line_bytes": 2048, "poll_interval": 60},
    })  # fmt: skip
    async with running_hub(config, check_tasks=False) as running:
        yield running


def client(hub: RunningHub, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{hub.url}/v1", api_key=key, max_retries=0)


async def stored(hub: RunningHub) -> tuple[int, int, int]:
    """File rows, batch rows, and files in the store's folder."""
    async with hub.services.engine.connect() as connection:
        rows = (await connection.execute(select(func.count()).select_from(files))).scalar_one()
        count = (await connection.execute(select(func.count()).select_from(batches))).scalar_one()
    assert hub.services.batches is not None
    folder = hub.services.batches.settings.files_dir or hub.services.config.data_dir / "files"
    return rows, count, len(os.listdir(folder))  # a few names: no need to leave the loop


async def rejected(api: openai.AsyncOpenAI, content: bytes) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        await api.files.create(file=("in.jsonl", io.BytesIO(content)), purpose="batch")
    return caught.value


async def test_bad_files_are_refused_naming_the_line(hub: RunningHub) -> None:
    key = await hub.create_key(owner="ann", allowed_models=[MODEL, "cloud-model"])
    api = client(hub, key)
    good = [request_line(i) for i in range(3)]
    cases = {
        "line 3 is not JSON": jsonl(good[:2]) + b"{not json\n",
        "line 1 names model 'nope', which does not exist": jsonl([request_line(0, "nope")]),
        "line 2 names model 'nope', but earlier lines 'batchy'":
            jsonl([good[0], request_line(1, "nope")]),
        f"line 1 names model '{SECRET}', which does not exist or this key may not use":
            jsonl([request_line(0, SECRET)]),
        "line 1 names model 'cloud-model', which cannot run batches":
            jsonl([request_line(0, "cloud-model")]),
        "line 2 is longer than 2048 bytes": jsonl([good[0], request_line(1, pad="x" * 3000)]),
        "line 2 repeats the custom_id 'req-0'": jsonl([good[0], good[0]]),
        "the file has no request lines": b"\n",
    }  # fmt: skip
    for expected, content in cases.items():
        error = await rejected(api, content)
        assert error.status_code == 400, expected
        body = error.body
        assert isinstance(body, dict) and expected in body["message"], (expected, body)
        assert body["type"] == "invalid_request_error" and body["param"] == "file", body
    big = jsonl([request_line(i, pad="y" * 1500) for i in range(60)])  # ~96 KiB > 64 KiB
    error = await rejected(api, big)
    assert error.status_code == 413 and "exceeds the limit of 65536 bytes" in str(error.body)
    assert await stored(hub) == (0, 0, 0)  # nothing kept of any refused upload


async def test_files_belong_to_their_owner(hub: RunningHub) -> None:
    ann = client(hub, await hub.create_key(owner="ann"))
    bob = client(hub, await hub.create_key(owner="bob"))
    content = jsonl([request_line(i) for i in range(5)])
    created = await ann.files.create(file=("five.jsonl", io.BytesIO(content)), purpose="batch")
    assert (created.bytes, created.filename, created.purpose) == (
        len(content),
        "five.jsonl",
        "batch",
    )
    assert (await ann.files.content(created.id)).content == content
    assert [f.id for f in (await ann.files.list()).data] == [created.id]
    assert (await bob.files.list()).data == []
    for call in (bob.files.retrieve(created.id), bob.files.content(created.id),
                 bob.files.delete(created.id)):  # fmt: skip
        with pytest.raises(openai.NotFoundError):
            await call
    with pytest.raises(openai.NotFoundError):
        await bob.batches.create(input_file_id=created.id, endpoint="/v1/chat/completions",
                                 completion_window="24h")  # fmt: skip
    with pytest.raises(openai.BadRequestError) as caught:
        await ann.batches.create(input_file_id=created.id, endpoint="/v1/chat/completions",
                                 completion_window="1h")  # type: ignore[arg-type]  # fmt: skip
    assert "completion_window must be one of: 24h" in str(caught.value.body)
    assert (await ann.files.delete(created.id)).deleted
    assert await stored(hub) == (0, 0, 0)


async def test_pages_and_a_batch_its_agent_cannot_take(hub: RunningHub) -> None:
    api = client(hub, await hub.create_key(owner="ann"))
    content = jsonl([request_line(i) for i in range(3)])
    made = [
        (await api.files.create(file=(f"{i}.jsonl", io.BytesIO(content)), purpose="batch")).id
        for i in range(5)
    ]
    first = await api.files.list(limit=2)
    assert [f.id for f in first.data] == made[::-1][:2] and first.has_more
    everything = [f.id async for f in api.files.list(limit=2)]  # the SDK follows `after`
    assert everything == made[::-1]
    created = [
        await api.batches.create(
            input_file_id=made[0], endpoint="/v1/chat/completions", completion_window="24h"
        )
        for _ in range(3)
    ]
    for batch in created:  # no agent listens: failed within the connect timeout
        assert batch.status == "validating"
        for _ in range(100):
            batch = await api.batches.retrieve(batch.id)
            if batch.status != "validating":
                break
            await asyncio.sleep(0.05)
        assert batch.status == "failed" and batch.failed_at and batch.errors
        assert "could not be asked" in (batch.errors.data[0].message or "")
        assert batch.request_counts and batch.request_counts.total == 3
    listed = [b.id async for b in api.batches.list(limit=2)]
    assert listed == [b.id for b in created[::-1]]
    with pytest.raises(openai.ConflictError):
        await api.batches.cancel(created[0].id)
