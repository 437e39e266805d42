"""Where the contents of /v1/files live: one small interface, a local directory by default.

Contents move in chunks and are never held whole in memory. A file being written is
invisible until `commit()`; a writer left without it removes what it wrote, so an upload
refused half-way leaves nothing behind. Local writes and reads are plain chunked file I/O
(a page-cache copy of at most CHUNK bytes per call, like the SQLite writes the hub already
does), not a thread per call: they do not wait on the network.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import TracebackType
from typing import Protocol

CHUNK = 256 * 1024
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class StoreError(Exception):
    """A file the store does not have, or cannot keep; str() says which and why."""


class StoreWriter(Protocol):
    """One file being written: `write` chunks, then `commit`; leaving without it aborts."""

    size: int

    async def __aenter__(self) -> StoreWriter: ...

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def write(self, data: bytes) -> None: ...

    def commit(self) -> None: ...


class FileStore(Protocol):
    def writer(self, file_id: str) -> StoreWriter: ...

    def read(self, file_id: str) -> AsyncIterator[bytes]: ...

    async def size(self, file_id: str) -> int: ...

    async def delete(self, file_id: str) -> None: ...

    async def remove_stale(self, before: float) -> int:
        """Remove what writers left uncommitted (their process was killed) before `before`
        (a wall-clock time); how many were removed."""
        ...

    async def committed_before(self, before: float) -> list[str]:
        """The ids of committed files last written before `before` (a wall-clock time)."""
        ...


def _checked(file_id: str) -> str:
    if not _ID.match(file_id):  # never a path: ids are ours, but checked all the same
        raise StoreError(f"{file_id[:80]!r} is not a file id")
    return file_id


class LocalWriter:
    def __init__(self, final: Path) -> None:
        self._final = final
        self._part = final.with_name(f".{final.name}.part")
        self._fd: int | None = None
        self.size = 0
        self._done = False

    async def __aenter__(self) -> LocalWriter:
        self._fd = os.open(self._part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if not self._done:
            self._part.unlink(missing_ok=True)

    def write(self, data: bytes) -> None:
        assert self._fd is not None, "write outside `async with`"
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view[:CHUNK])
            view = view[written:]
        self.size += len(data)

    def commit(self) -> None:
        assert self._fd is not None, "commit outside `async with`"
        os.fsync(self._fd)
        os.replace(self._part, self._final)
        self._done = True


class LocalFileStore:
    """Files as `<folder>/<id>` (0600, in a 0700 folder)."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.folder = folder

    def _path(self, file_id: str) -> Path:
        return self.folder / _checked(file_id)

    def writer(self, file_id: str) -> LocalWriter:
        return LocalWriter(self._path(file_id))

    async def read(self, file_id: str) -> AsyncIterator[bytes]:
        try:
            handle = self._path(file_id).open("rb")
        except FileNotFoundError:
            raise StoreError(f"the contents of {file_id} are missing") from None
        with handle:
            while chunk := handle.read(CHUNK):
                yield chunk

    async def size(self, file_id: str) -> int:
        try:
            return self._path(file_id).stat().st_size
        except FileNotFoundError:
            raise StoreError(f"the contents of {file_id} are missing") from None

    async def delete(self, file_id: str) -> None:
        self._path(file_id).unlink(missing_ok=True)

    async def remove_stale(self, before: float) -> int:
        removed = 0
        for name in self._written_before(before, _is_partial):
            try:
                os.unlink(self.folder / name)
                removed += 1
            except FileNotFoundError:  # its writer ended meanwhile
                continue
        return removed

    async def committed_before(self, before: float) -> list[str]:
        return self._written_before(before, _is_committed)

    def _written_before(self, before: float, wanted: Callable[[str], bool]) -> list[str]:
        """Names in the folder that `wanted` accepts, last written before `before`."""
        found = []
        with os.scandir(self.folder) as entries:
            for entry in entries:
                if not wanted(entry.name):
                    continue
                try:
                    if entry.stat().st_mtime < before:
                        found.append(entry.name)
                except FileNotFoundError:  # gone meanwhile
                    continue
        return found


def _is_partial(name: str) -> bool:
    """A writer's file before its commit (`.<id>.part`)."""
    return name.startswith(".") and name.endswith(".part")


def _is_committed(name: str) -> bool:
    return not name.startswith(".") and _ID.match(name) is not None
