"""The agent's crash-safe memory: `<state_dir>/agent-state.json` and `<state_dir>/agent-id`.

Slurm stays the source of truth for which jobs exist; this file only keeps what Slurm
cannot tell: draining flags, renewal links, failure counters, when jobs became ready, and
each service's recent load (the scaling policy's window: without it, a restarted agent
would scale down at once what the load of the last minutes holds up).
It is rewritten atomically after every act, so a crash loses at most one loop.

The agent id lives in its own file as well: it is what tags our jobs (`JobTag`), so a
corrupt state file must not lose it, or the next agent could not adopt its jobs.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hpc.jobs.system import stable_token, write_atomic
from hpc.scheduler.policy import Backoff, LoadSample

log = logging.getLogger(__name__)

STATE_FILE = "agent-state.json"
AGENT_ID_FILE = "agent-id"
VERSION = 1


class StateError(Exception):
    """The state file exists but cannot be used; str() says why in one line."""


@dataclass(frozen=True)  # changed only by replacing it (hpc/scheduler/live.py)
class JobRecord:
    service: str
    first_seen: float
    running_since: float | None = None
    ready_since: float | None = None
    draining: bool = False
    cancelled: bool = False
    replaces: str | None = None
    operator_drain: str = ""  # an operator asked to drain it: "", "replace" or "now"
    drain_reason: str = ""  # why it is draining (the policy's Drain reason)
    moved_from: str | None = None  # the pending job it replaced elsewhere (moved only once)


@dataclass
class AgentState:
    agent_id: str
    jobs: dict[str, JobRecord] = field(default_factory=dict)
    backoff: dict[str, Backoff] = field(default_factory=dict)
    loads: dict[str, list[LoadSample]] = field(default_factory=dict)  # oldest first

    def to_json(self) -> str:
        data = {
            "version": VERSION,
            "agent_id": self.agent_id,
            "jobs": {job_id: asdict(record) for job_id, record in self.jobs.items()},
            "backoff": {name: asdict(b) for name, b in self.backoff.items()},
            # [at, routed, in_backends]: compact, the file is rewritten every loop
            "loads": {
                name: [[s.at, s.routed, s.in_backends] for s in samples]
                for name, samples in self.loads.items()
            },
        }
        return json.dumps(data, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> AgentState:
        try:
            data = json.loads(text)
            if data.get("version") != VERSION:
                raise StateError(f"unknown state version {data.get('version')!r}")
            return cls(
                agent_id=_text(data["agent_id"]),
                jobs={str(k): JobRecord(**_fields(v)) for k, v in data["jobs"].items()},
                backoff={str(k): Backoff(**_fields(v)) for k, v in data["backoff"].items()},
                loads={str(k): _samples(v) for k, v in data.get("loads", {}).items()},
            )
        except StateError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise StateError(f"malformed state: {type(error).__name__}: {error}") from None


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("agent_id must be a non-empty string")
    return value


def _samples(value: Any) -> list[LoadSample]:
    """Load samples as saved; a file of an agent before they were saved has none."""
    if not isinstance(value, list):
        raise TypeError("expected a list of load samples")
    return [LoadSample(float(at), int(routed), int(backends)) for at, routed, backends in value]


def _fields(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError("expected an object")
    return value


def agent_id(state_dir: Path) -> str:
    """This state dir's agent id, created on first use (stable across restarts)."""
    return stable_token(state_dir / AGENT_ID_FILE)


def load_state(state_dir: Path, expected_id: str) -> AgentState:
    """The saved state, or a fresh one; StateError if the file is corrupt or not ours."""
    path = state_dir / STATE_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return AgentState(agent_id=expected_id)
    except (OSError, UnicodeDecodeError) as error:
        raise StateError(f"{path}: cannot read: {error}") from None
    try:
        state = AgentState.from_json(text)
    except StateError as error:
        raise StateError(f"{path}: {error}") from None
    if state.agent_id != expected_id:
        raise StateError(f"{path}: agent id {state.agent_id} does not match {expected_id}")
    return state


def restore_state(state_dir: Path, ident: str) -> AgentState:
    """The saved state; a corrupt file is reported and the state rebuilt from Slurm."""
    try:
        return load_state(state_dir, ident)
    except StateError as error:
        log.error("%s; rebuilding from Slurm", error)
        return AgentState(agent_id=ident)


def save_state(state_dir: Path, state: AgentState) -> None:
    write_atomic(state_dir / STATE_FILE, state.to_json())
