"""Whether the hub's database answers, and what the API says while it does not.

An outage (server stopped or unreachable, SQLite locked past its busy timeout) is noticed by
whoever uses the database first: a request, the usage writer or its probe. From then on
requests that need the database get 503 with Retry-After at once instead of each waiting
for a timeout; the usage writer is the only one that keeps trying (with back-off), and its
first success ends the outage. One warning line when an outage starts, one when it ends.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager

import asyncpg
from sqlalchemy import exc as sa_exc

from hub.errors import ApiError

log = logging.getLogger(__name__)

RETRY_AFTER = 5  # seconds: about one back-off step of the writer's probe

# Errors that say the database cannot be reached or used right now (retry later), as
# opposed to errors about one statement or its values.
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    sqlite3.OperationalError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.InterfaceError,
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.DisconnectionError,
    sa_exc.TimeoutError,
)
# Everything a database call can raise besides a bug in the hub.
DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    *OUTAGE_ERRORS,
    sa_exc.SQLAlchemyError,
    sqlite3.Error,
    asyncpg.PostgresError,
    OverflowError,
)


def is_outage(error: BaseException) -> bool:
    if isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated:
        return True
    return isinstance(error, OUTAGE_ERRORS)


def describe(error: BaseException) -> str:
    """One short line: the driver's message, without SQLAlchemy's statement and parameters
    (which can hold user names)."""
    cause = error.orig if isinstance(error, sa_exc.DBAPIError) else error
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    return f"{type(cause).__name__}: {text[:200]}" if text else type(cause).__name__


class DatabaseUnavailable(ApiError):
    """The API's answer while the database is unavailable: 503, Retry-After."""

    def __init__(self, reason: str) -> None:
        super().__init__(
            503,
            "the hub's database is unavailable; retry later",
            code="database_unavailable",
            headers={"Retry-After": str(RETRY_AFTER)},
        )
        self.reason = reason


class DatabaseHealth:
    """The outage state shared by the request path, the usage writer and /health."""

    def __init__(self) -> None:
        self.down_since: float | None = None
        self.reason = ""
        self.outages = 0

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def check(self) -> None:
        """Fail at once while the database is known to be down (DatabaseUnavailable)."""
        if self.down_since is not None:
            raise DatabaseUnavailable(self.reason)

    def failed(self, error: BaseException, what: str) -> None:
        """Note an outage error; the first of an outage logs one warning."""
        self.reason = f"{what}: {describe(error)}"
        if self.down_since is None:
            self.down_since = time.time()
            self.outages += 1
            log.warning("database unavailable (%s); requests that need it get 503", self.reason)

    def recovered(self) -> None:
        """A write went through: the outage, if any, is over."""
        if self.down_since is not None:
            log.warning("database available again after %.1f s", time.time() - self.down_since)
            self.down_since = None
            self.reason = ""

    @contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Around one use of the database for a request: fail fast during an outage, and
        turn a database error into DatabaseUnavailable (logged once per outage; an error
        that is not an outage is logged as an error, without a traceback)."""
        self.check()
        try:
            yield
        except DATABASE_ERRORS as error:
            if is_outage(error):
                self.failed(error, what)
                raise DatabaseUnavailable(self.reason) from None
            # Not an outage (this statement or its values): no retry will help, no 503.
            log.error("database error (%s): %s", what, describe(error))
            raise ApiError(
                500, "the hub's database refused the request", code="database_error"
            ) from None
