"""The `model` field of a multipart request (the audio endpoints), found while the body
streams in, and renamed without decoding the upload: the body passes to the upstream as the
client sent it.

The form is parsed by its part headers (python-multipart's streaming parser), so text
inside an uploaded file that looks like a `model` part is never taken for one. Reading
stops as soon as the `model` part has ended: a client that sends it first (the OpenAI SDK
does) is refused (missing or unknown model, endpoint not served) before its upload is read.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from python_multipart.multipart import MultipartParser, parse_options_header

from hub.errors import ApiError

MAX_MODEL = 256  # bytes of the model field
MAX_HEADER = 1024  # bytes of one part header
MAX_PARTS_BEFORE_MODEL = 16


def _invalid(message: str) -> ApiError:
    return ApiError(400, message, param="model", code="invalid_form")


class ModelPart:
    """Feeds a multipart body to the parser until its `model` part has ended; `model` and
    `where` (its bytes' place in the body) are set then."""

    def __init__(self, content_type: str) -> None:
        kind, options = parse_options_header(content_type)
        boundary = options.get(b"boundary")
        if kind != b"multipart/form-data":
            raise ApiError(400, "send the audio as multipart/form-data", code="invalid_request")
        if not boundary:
            raise ApiError(400, "the multipart body names no boundary", code="invalid_request")
        self.model: str | None = None
        self.where = slice(0, 0)
        self._offset = 0  # bytes fed before the current chunk
        self._chunk = b""
        self._parts = 0
        self._header = [b"", b""]
        self._in_model = False
        self._value = bytearray()
        self._span: list[int] = []
        callbacks: dict[str, Any] = {
            "on_part_begin": self._begin,
            "on_header_field": lambda d, s, e: self._add(0, d[s:e]),
            "on_header_value": lambda d, s, e: self._add(1, d[s:e]),
            "on_header_end": self._header_end,
            "on_part_data": self._data,
            "on_part_end": self._end,
        }
        self._parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]

    def feed(self, chunk: bytes) -> bool:
        """Parse one more piece of the body; True once the model part has ended."""
        self._chunk = chunk
        try:
            self._parser.write(chunk)
        except ApiError:
            raise
        except (ValueError, KeyError) as error:
            raise _invalid(f"the form is malformed: {error}") from None
        self._offset += len(chunk)
        return self.model is not None

    def _begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_PARTS_BEFORE_MODEL:
            raise _invalid(f"no `model` field in the first {MAX_PARTS_BEFORE_MODEL} parts")
        self._in_model = False

    def _add(self, index: int, data: bytes) -> None:
        self._header[index] += data
        if len(self._header[index]) > MAX_HEADER:
            raise _invalid("a form part's header is too long")

    def _header_end(self) -> None:
        field, value = self._header
        self._header = [b"", b""]
        if field.strip().lower() == b"content-disposition":
            _kind, options = parse_options_header(value)
            self._in_model = options.get(b"name") == b"model" and b"filename" not in options

    def _data(self, data: bytes, start: int, end: int) -> None:
        if not self._in_model:
            return
        # Data the parser held back as a possible boundary comes from its own buffer: it
        # is the tail of the previous piece, just before the current one.
        first = self._offset + start if data is self._chunk else self._offset - (end - start)
        if not self._span:
            self._span = [first, first]
        self._span[1] = first + end - start
        self._value += data[start:end]
        if len(self._value) > MAX_MODEL:
            raise _invalid("the `model` field is too long")

    def _end(self) -> None:
        if not self._in_model:
            return
        try:
            model = self._value.decode().strip()
        except UnicodeDecodeError:
            raise _invalid("the `model` field is not UTF-8") from None
        if not model:
            raise ApiError(400, "`model` is required", param="model", code="missing_model")
        self.model, self.where = model, slice(*self._span)


async def read_model(
    chunks: AsyncIterator[bytes], content_type: str, limit: int
) -> tuple[str, slice, list[bytes]]:
    """Read until the model part has ended: the model, its place, and the pieces read (the
    rest of the body is still in `chunks`). At most `limit` bytes; then 413."""
    form = ModelPart(content_type)
    pieces: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        pieces.append(chunk)
        if form.feed(chunk):
            assert form.model is not None
            return form.model, form.where, pieces
    raise ApiError(400, "`model` is required", param="model", code="missing_model")


def renamed(head: bytes, where: slice, target: str) -> bytes:
    """The body's first bytes with the model field set to the upstream's name (an alias)."""
    return head[: where.start] + target.encode() + head[where.stop :]


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body larger than {limit} bytes", code="body_too_large")


async def whole_body(
    head: bytes, size: int, chunks: AsyncIterator[bytes], limit: int
) -> AsyncIterator[bytes]:
    """The body as it streams on: the (renamed) head, then the pieces still to come; up to
    `limit` bytes received in all, `size` of them already (a rename changes no bound)."""
    yield head
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        yield chunk
