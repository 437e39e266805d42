"""One replica's view of the shared rate-limit windows, kept in memory (no I/O, no awaits).

Per subject (key, user, group) and window it holds the totals the database last returned
(`Shared`: every replica's synced requests, this one's included, and the tokens the usage
writers added) and this replica's requests not yet in them: `pending` (counted here since
the last sync began) and `sending` (in the statement a sync has in flight). A request is
decided against shared + sending + pending + itself (`hub.usage.limits.local_counts`), so with a
single replica the count is exact; other replicas' requests arrive with each sync.

Only the event loop touches a book: admission reads and adds, the sync task takes and
settles (`hub/usage/window_sync.py`). A subject the book does not know is read from the database
first (`Admission`), so a new or restarted replica starts from the shared totals.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import cast

from hub.usage.counters import CounterRow, Row
from hub.usage.limits import Counts, Shared, Window, local_counts

Slot = tuple[str, Window, int]  # subject, window, start
IDLE_AFTER = 120.0  # seconds without a request before a subject is forgotten (and re-read)


def _window(period: str) -> Window:
    return cast(Window, period)  # the counter store holds only the names in WINDOWS


def _add(counts: dict[Slot, int], slot: Slot, requests: int) -> None:
    total = counts.get(slot, 0) + requests
    if total:
        counts[slot] = total
    else:
        counts.pop(slot, None)


class WindowBook:
    def __init__(self, idle_after: float = IDLE_AFTER) -> None:
        self._idle_after = idle_after
        self._shared: dict[str, dict[Window, Shared]] = {}
        self._pending: dict[Slot, int] = {}
        self._sending: dict[Slot, int] = {}
        self._used: dict[str, float] = {}  # subject -> its last request (epoch seconds)

    def known(self, subject: str) -> bool:
        return subject in self._shared

    def counts(self, subject: str, starts: Mapping[Window, int]) -> Counts:
        """What a request of `subject` would make of each window (itself included)."""
        unsynced = {
            window: self._pending.get((subject, window, start), 0)
            + self._sending.get((subject, window, start), 0)
            for window, start in starts.items()
        }
        return local_counts(self._shared.get(subject, {}), unsynced, starts)

    def add(self, subject: str, starts: Mapping[Window, int], used_at: float) -> None:
        """Count one admitted request of `subject` in every window, to be synced."""
        for window, start in starts.items():
            _add(self._pending, (subject, window, start), 1)
        self._used[subject] = used_at

    def install(self, totals: Iterable[CounterRow], used_at: float) -> None:
        """Totals read for subjects the book did not know. A read may overtake another: of
        two totals of one window the larger is the later (counts only grow in a window)."""
        for row in totals:
            windows = self._shared.setdefault(row.subject, {})
            window = _window(row.period)
            old = windows.get(window)
            if old is None or (row.start, row.requests) > (old.start, old.requests):
                windows[window] = Shared(row.start, row.requests, row.tokens)
            self._used.setdefault(row.subject, used_at)

    def tokens_written(self, rows: Iterable[Row]) -> None:
        """Tokens this replica's usage writer has just added to the database, part of the
        shared totals from now on, so that a single replica is exact for tokens too. (A sync
        that read them already counts them twice until the next one: the safe side.)"""
        for subject, period, start, _requests, tokens in rows:
            windows = self._shared.get(subject, {})
            old = windows.get(_window(period))
            if old is not None and old.start == start:
                windows[_window(period)] = Shared(start, old.requests, old.tokens + tokens)

    def take(self, starts: Mapping[Window, int], now: float) -> list[Row]:
        """The rows of one sync: every pending count, and a zero for each current window of
        each subject in use (to read what the other replicas counted). Pending counts move
        to `sending` until `settled` or `requeue`. Idle subjects are forgotten first."""
        self._forget_idle(now)
        rows = dict(self._pending)
        for subject in self._shared:
            for window, start in starts.items():
                rows.setdefault((subject, window, start), 0)
        for slot, requests in self._pending.items():
            _add(self._sending, slot, requests)
        self._pending.clear()
        return [(subject, window, start, n, 0) for (subject, window, start), n in rows.items()]

    def settled(self, rows: Sequence[Row], totals: Iterable[CounterRow]) -> None:
        """`rows` are written and `totals` are the database's after them: the counts sent
        are now part of the shared totals. The database is the truth: its totals replace
        older ones of the same window (a give-back may have lowered them)."""
        for subject, period, start, requests, _tokens in rows:
            _add(self._sending, (subject, _window(period), start), -requests)
        for row in totals:
            windows = self._shared.get(row.subject)
            if windows is None:
                continue
            old = windows.get(_window(row.period))
            if old is None or row.start >= old.start:
                windows[_window(row.period)] = Shared(row.start, row.requests, row.tokens)

    def requeue(self, rows: Sequence[Row]) -> None:
        """`rows` were not written (or not surely): their counts wait for the next sync. A
        statement cut by cancellation may have committed all the same: then they count
        twice, which refuses more, never admits more."""
        for subject, period, start, requests, _tokens in rows:
            slot: Slot = (subject, _window(period), start)
            _add(self._sending, slot, -requests)
            _add(self._pending, slot, requests)

    @property
    def unsynced(self) -> int:
        """Requests counted here and not yet in the database (summed over windows)."""
        return sum(self._pending.values()) + sum(self._sending.values())

    @property
    def subjects(self) -> int:
        return len(self._shared)

    def _forget_idle(self, now: float) -> None:
        """Forget subjects idle for `idle_after` with nothing to sync: a later request reads
        them again, so the sync reads only subjects in use."""
        busy = {slot[0] for slot in self._pending} | {slot[0] for slot in self._sending}
        for subject, used in list(self._used.items()):
            if now - used >= self._idle_after and subject not in busy:
                del self._used[subject]
                self._shared.pop(subject, None)
