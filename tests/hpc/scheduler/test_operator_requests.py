"""Operator request files and the leader's pid: validation, round trip, bad files."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from hpc.scheduler.leader import LOCK_FILE, LeaderLock
from hpc.scheduler.operator_requests import (
    PID_FILE,
    DrainRequest,
    ReloadRequest,
    RequestError,
    leader_pid,
    remove_pid,
    requests_dir,
    take_requests,
    write_drain,
    write_pid,
    write_reload,
)


@pytest.mark.parametrize("job", ["../../etc/passwd", "7/../../x", "-1", "", "7 8", "local-"])
def test_drain_requests_take_only_job_ids(tmp_path: Path, job: str) -> None:
    with pytest.raises(RequestError, match="is not a job id"):
        write_drain(tmp_path, DrainRequest(job_id=job))
    assert not requests_dir(tmp_path).exists()


def test_requests_round_trip_and_are_taken_once(tmp_path: Path) -> None:
    write_drain(tmp_path, DrainRequest(job_id="12_3", now=True))
    path = write_drain(tmp_path, DrainRequest(service="org/model:v1"))
    assert path.parent == requests_dir(tmp_path)  # a '/' in the name stays inside
    write_reload(tmp_path)
    taken = take_requests(tmp_path)
    assert set(taken) == {
        DrainRequest(job_id="12_3", now=True),
        DrainRequest(service="org/model:v1"),
        ReloadRequest(),
    }
    assert take_requests(tmp_path) == []
    assert list(requests_dir(tmp_path).iterdir()) == []


def test_bad_request_files_are_logged_and_removed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = requests_dir(tmp_path)
    folder.mkdir()
    (folder / "garbage.json").write_text("{not json")
    (folder / "escape.json").write_text('{"job": "../../etc/passwd"}')
    (folder / "both.json").write_text('{"job": "1", "service": "a"}')
    (folder / ".drain-1.json.99.tmp").write_text("{}")  # a writer's temporary file
    with caplog.at_level(logging.ERROR, logger="hpc.scheduler.operator_requests"):
        assert take_requests(tmp_path) == []
    assert len(caplog.records) == 3
    assert [p.name for p in folder.iterdir()] == [".drain-1.json.99.tmp"]


async def test_leader_pid_only_while_an_agent_holds_the_lock(tmp_path: Path) -> None:
    with pytest.raises(RequestError, match="no agent is running"):
        leader_pid(tmp_path)
    async with LeaderLock(tmp_path / LOCK_FILE):
        with pytest.raises(RequestError, match="no usable pid"):
            leader_pid(tmp_path)
        write_pid(tmp_path)
        assert leader_pid(tmp_path) == os.getpid()
        remove_pid(tmp_path)
        assert not (tmp_path / PID_FILE).exists()
    write_pid(tmp_path)  # a stale pid file is never trusted without the lock
    with pytest.raises(RequestError, match="no agent is running"):
        leader_pid(tmp_path)
