"""A failure that repeats every loop until its cause goes away (Slurm down, a full disk).

The agent retries each loop; logging each attempt would flood the log (and, with a full
disk, the log itself may be on it). An `Episode` logs the first failure and the recovery,
one line each, and knows since when it lasts.
"""

from __future__ import annotations

import logging


class Episode:
    """`failed(now, message)` on every failing attempt, `ok(now)` on every good one."""

    def __init__(self, log: logging.Logger, recovered: str) -> None:
        self._log = log
        self._recovered = recovered  # %-format with the episode's length in seconds
        self.since: float | None = None
        self.message = ""

    def failed(self, now: float, message: str) -> None:
        self.message = message
        if self.since is None:
            self.since = now
            self._log.warning("%s; serving on, retrying every loop", message)

    def ok(self, now: float) -> None:
        if self.since is not None:
            self._log.warning(self._recovered, now - self.since)
            self.since, self.message = None, ""
