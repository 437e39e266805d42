"""A multipart/form-data upload (what the OpenAI SDK sends to POST /v1/files), as a stream.

Each piece of the request body goes through python-multipart's streaming parser; the
`file` part's bytes go straight to a sink (the line checker and the store's writer) and
small text fields are kept (bounded). Nothing of the file is held beyond one piece.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from python_multipart.multipart import MultipartParser, parse_options_header

from hub.errors import ApiError

MAX_FIELD = 1024  # bytes of a text field (purpose)
MAX_PARTS = 16


class FormUpload:
    """Parses one form; `file_sink(data)` gets the file part's bytes as they come."""

    def __init__(self, content_type: str, file_sink: Callable[[bytes], None]) -> None:
        kind, options = parse_options_header(content_type)
        boundary = options.get(b"boundary")
        if kind != b"multipart/form-data" or not boundary:
            raise ApiError(
                400, "upload the file as multipart/form-data", code="invalid_content_type"
            )
        self._sink = file_sink
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.file_bytes = 0
        self._parts = 0
        self._header: list[bytes] = [b"", b""]
        self._disposition = b""
        self._name: str | None = None
        self._value = bytearray()
        callbacks: dict[str, Any] = {
            "on_part_begin": self._begin,
            "on_header_field": lambda d, s, e: self._add(0, d[s:e]),
            "on_header_value": lambda d, s, e: self._add(1, d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_done,
            "on_part_data": lambda d, s, e: self._data(d[s:e]),
            "on_part_end": self._end,
        }
        self._parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]

    async def consume(self, chunks: AsyncIterator[bytes]) -> None:
        async for chunk in chunks:
            try:
                self._parser.write(chunk)
            except (ValueError, KeyError) as error:
                if isinstance(error, ApiError):
                    raise
                raise ApiError(
                    400, f"the form is malformed: {error}", code="invalid_form"
                ) from None
        self._parser.finalize()

    def _begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise ApiError(400, "the form has too many parts", code="invalid_form")
        self._disposition, self._name = b"", None
        self._value.clear()

    def _add(self, index: int, data: bytes) -> None:
        self._header[index] += data
        if len(self._header[index]) > MAX_FIELD:
            raise ApiError(400, "a form part's header is too long", code="invalid_form")

    def _header_end(self) -> None:
        if self._header[0].strip().lower() == b"content-disposition":
            self._disposition = self._header[1]
        self._header = [b"", b""]

    def _headers_done(self) -> None:
        _kind, options = parse_options_header(self._disposition)
        name = options.get(b"name")
        self._name = name.decode("utf-8", "replace") if name else None
        if self._name == "file":
            filename = options.get(b"filename", b"upload.jsonl")
            self.filename = filename.decode("utf-8", "replace")[-255:] or "upload.jsonl"

    def _data(self, data: bytes) -> None:
        if self._name == "file":
            self.file_bytes += len(data)
            self._sink(data)
            return
        self._value += data
        if len(self._value) > MAX_FIELD:
            raise ApiError(400, f"the form field {self._name!r} is too long", code="invalid_form")

    def _end(self) -> None:
        if self._name and self._name != "file":
            self.fields[self._name] = self._value.decode("utf-8", "replace")
