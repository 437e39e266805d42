"""Files expire (the real hub, uvicorn, the unchanged `openai` SDK): `expires_after` on an
upload and the operator's `batches.file_lifetime` set `expires_at`; an expired file reads
as gone (404 in OpenAI's error shape) at once and the sweep removes its contents and row;
a sweep that fails shows in /health until one succeeds."""

from __future__ import annotations

import io
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
from sqlalchemy import select

from hub.batches.tables import files
from hub.config import parse_config
from tests.hpc.helpers import until
from tests.hub.batches.test_batch_files import client, jsonl, request_line
from tests.hub.helpers import RunningHub, running_hub

MODEL = "batchy"
LIFETIME = 1.0  # the operator's default in these tests: one second


@pytest.fixture
async def hub(tmp_path: Path, database_url: str) -> AsyncIterator[RunningHub]:
    site = {"socket": str(tmp_path / "no-agent.sock")}
    config = parse_config({
        "data_dir": str(tmp_path / "hub-data"), "database_url": database_url,
        "upstreams": {"cluster": {"kind": "hpc", "sites": [site], "timeouts": {"connect": 0.3}}},
        "models": [{"id": MODEL, "upstream": "cluster"}],
        "batches": {"poll_interval": 0.2, "file_lifetime": LIFETIME,
                    "files_dir": str(tmp_path / "files")},
    })  # fmt: skip
    async with running_hub(config, check_tasks=False) as running:
        yield running


async def upload(api: openai.AsyncOpenAI, **options: Any) -> Any:
    content = jsonl([request_line(i) for i in range(3)])
    return await api.files.create(
        file=("in.jsonl", io.BytesIO(content)), purpose="batch", **options
    )


async def rows(hub: RunningHub) -> list[str]:
    async with hub.services.engine.connect() as connection:
        return list((await connection.execute(select(files.c.id))).scalars())


async def test_files_expire_and_are_removed(hub: RunningHub, tmp_path: Path) -> None:
    api = client(hub, await hub.create_key(owner="ann"))
    lifetime = {"anchor": "created_at", "seconds": 3600}
    kept = await upload(api, expires_after=lifetime)
    assert kept.expires_at == kept.created_at + 3600
    assert (await api.files.retrieve(kept.id)).expires_at == kept.expires_at
    brief = await upload(api)  # the operator's default: one second
    assert brief.expires_at == brief.created_at + int(LIFETIME)

    async def gone() -> openai.NotFoundError:
        try:
            await api.files.content(brief.id)
        except openai.NotFoundError as error:
            return error
        raise AssertionError("still there")

    await until(lambda: brief.id not in os.listdir(tmp_path / "files"), 30, "the sweep")
    error = await gone()
    assert isinstance(error.body, dict) and error.body["code"] == "file_not_found"
    assert error.body["param"] == "file_id" and brief.id in error.body["message"]
    assert await rows(hub) == [kept.id]
    assert os.listdir(tmp_path / "files") == [kept.id]
    assert [f.id for f in (await api.files.list()).data] == [kept.id]
    with pytest.raises(openai.NotFoundError):  # an expired file is no batch input either
        await api.batches.create(input_file_id=brief.id, endpoint="/v1/chat/completions",
                                 completion_window="24h")  # fmt: skip
    status, body = hub.services.health()
    assert status == 200 and "batches" not in body


async def test_a_failing_sweep_shows_in_health_until_one_succeeds(
    hub: RunningHub, tmp_path: Path
) -> None:
    api = client(hub, await hub.create_key(owner="ann"))
    stuck = await upload(api)
    path = tmp_path / "files" / stuck.id
    path.unlink()
    path.mkdir()  # its contents cannot be removed (a directory), even by root
    await until(lambda: "batches" in hub.services.health()[1], 30, "the failure in /health")
    status, body = hub.services.health()
    assert status == 200, body  # shown; the hub still serves
    assert "IsADirectoryError" in body["batches"]["file expiry"], body
    assert await rows(hub) == [stuck.id]  # kept for the next sweep
    path.rmdir()
    await until(lambda: "batches" not in hub.services.health()[1], 30, "a sweep succeeding")
    assert await rows(hub) == []


async def test_bad_expires_after_is_refused(hub: RunningHub) -> None:
    api = client(hub, await hub.create_key(owner="ann"))
    bad: list[Any] = [{"anchor": "created_at", "seconds": 60},
                      {"anchor": "created_at", "seconds": 31 * 86400},
                      {"anchor": "last_active_at", "seconds": 3600}]  # fmt: skip
    for value in bad:
        with pytest.raises(openai.BadRequestError) as caught:
            await upload(api, expires_after=value)
        body = caught.value.body
        assert isinstance(body, dict) and body["param"] == "expires_after", body
        assert "from 3600 to 2592000" in body["message"]
    good = await upload(api, expires_after={"anchor": "created_at", "seconds": 3600})
    with pytest.raises(openai.BadRequestError) as caught:
        await api.batches.create(
            input_file_id=good.id, endpoint="/v1/chat/completions", completion_window="24h",
            output_expires_after={"anchor": "created_at", "seconds": 5},
        )  # fmt: skip
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["param"] == "output_expires_after"
    assert await rows(hub) == [good.id]  # nothing of the refused uploads kept


async def test_writes_a_killed_replica_left_are_removed_once_stale(
    hub: RunningHub, tmp_path: Path
) -> None:
    folder, old = tmp_path / "files", time.time() - 2 * 86400
    for name in (".file-old.part", ".file-new.part"):
        (folder / name).write_bytes(b'{"custom_id": "half')
    os.utime(folder / ".file-old.part", (old, old))  # as a writer killed two days ago left it
    assert hub.services.batches is not None
    hub.services.batches.stale_swept = 0.0  # due now, not in an hour
    await until(lambda: ".file-old.part" not in os.listdir(folder), 30, "the stale write gone")
    assert os.listdir(folder) == [".file-new.part"]  # a write under way is left alone


async def test_a_stored_file_no_row_names_is_removed_once_stale(
    hub: RunningHub, tmp_path: Path
) -> None:
    """A replica stopped between committing a batch's output to the store and recording it:
    the file is named by no row, and goes once it is a day old."""
    api = client(hub, await hub.create_key(owner="ann"))
    kept = await upload(api)
    folder, old = tmp_path / "files", time.time() - 2 * 86400
    for name in ("file-orphan-old", "file-orphan-new"):
        (folder / name).write_bytes(b'{"custom_id": "x"}\n')
    os.utime(folder / "file-orphan-old", (old, old))
    os.utime(folder / kept.id, (old, old))  # old, but named by its row
    assert hub.services.batches is not None
    hub.services.batches.stale_swept = 0.0  # due now, not in an hour
    await until(lambda: "file-orphan-old" not in os.listdir(folder), 30, "the orphan gone")
    assert sorted(os.listdir(folder)) == sorted(["file-orphan-new", kept.id])
    assert (await api.files.content(kept.id)).content
