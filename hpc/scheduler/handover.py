"""An agent restart without cut streams: the stopping agent hands over at once.

On SIGTERM the leader stops acting and saves its state (`Agent.run`), then calls
`hand_over`: its pid file goes and the leader lock is released, so the next agent (a
standby, or the one the relay starts for the hub's next connection) leads and binds a new
`agent.sock` while the old router finishes the streams in flight on its own connections
(`hpc.router.server.Router.retire`; the hub side is in `saia/base/handover.py`).
"""

from __future__ import annotations

import logging

from hpc.config import AgentConfig
from hpc.scheduler.leader import LeaderLock
from hpc.scheduler.operator_requests import remove_pid

log = logging.getLogger(__name__)
HANDOVER_GRACE = 900.0  # at most this long for the streams in flight when stopping


def hand_over(config: AgentConfig, lock: LeaderLock) -> None:
    """Let the next agent lead now; this one only finishes its streams from here on (not
    when draining on exit: then the jobs go, and the streams with them)."""
    remove_pid(config.state_dir)
    lock.release()
    log.info("stopping: the next agent may lead; finishing the streams in flight")
