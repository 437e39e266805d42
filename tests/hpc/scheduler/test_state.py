"""The agent's state file: round trip, stable agent id, corrupt or foreign files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hpc.scheduler.policy import Backoff
from hpc.scheduler.state import (
    AGENT_ID_FILE,
    STATE_FILE,
    AgentState,
    JobRecord,
    StateError,
    agent_id,
    load_state,
    save_state,
)


def test_round_trip(tmp_path: Path) -> None:
    state = AgentState(
        agent_id="abc123",
        jobs={
            "17": JobRecord("llm", 1.5, running_since=2.0, ready_since=3.0, replaces="16"),
            "16": JobRecord("llm", 0.5, draining=True, cancelled=True),
        },
        backoff={"llm": Backoff(failures=2, last_failure=9.0, not_before=29.0)},
    )
    save_state(tmp_path, state)
    assert load_state(tmp_path, "abc123") == state
    assert (tmp_path / STATE_FILE).stat().st_mode & 0o777 == 0o600


def test_missing_file_gives_fresh_state(tmp_path: Path) -> None:
    assert load_state(tmp_path, "x1") == AgentState(agent_id="x1")


def test_agent_id_is_stable_per_state_dir(tmp_path: Path) -> None:
    first = agent_id(tmp_path)
    assert first.isalnum() and len(first) == 12
    assert agent_id(tmp_path) == first
    assert agent_id(tmp_path / "other") != first
    (tmp_path / AGENT_ID_FILE).write_text("../../etc\n")  # garbage is replaced, not used
    assert agent_id(tmp_path) not in (first, "../../etc")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "malformed state: JSONDecodeError"),
        ('{"version": 99}', "unknown state version 99"),
        ('{"version": 1, "agent_id": "a1", "jobs": []}', "malformed state"),
        (
            '{"version": 1, "agent_id": "a1", "jobs": {"1": {"bogus": 1}}, "backoff": {}}',
            "TypeError",
        ),
        ("[]", "malformed state: AttributeError"),
    ],
)
def test_corrupt_file_is_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / STATE_FILE).write_text(text)
    with pytest.raises(StateError, match=message) as caught:
        load_state(tmp_path, "a1")
    assert str(caught.value).startswith(str(tmp_path / STATE_FILE))
    assert "\n" not in str(caught.value)


def test_state_of_another_agent_is_refused(tmp_path: Path) -> None:
    save_state(tmp_path, AgentState(agent_id="other1"))
    with pytest.raises(StateError, match="does not match"):
        load_state(tmp_path, "mine22")


def test_write_leaves_no_temporary_files(tmp_path: Path) -> None:
    for n in range(3):
        save_state(tmp_path, AgentState(agent_id="a1", jobs={str(n): JobRecord("s", 1.0)}))
    assert sorted(os.listdir(tmp_path)) == [STATE_FILE]
