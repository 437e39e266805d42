"""The `model` field of a multipart request (the audio endpoints), read and renamed without
decoding the upload: the body passes to the upstream as the client sent it."""

from __future__ import annotations

import re

from hub.errors import ApiError

_BOUNDARY = re.compile(r'boundary="?([^";,\s]{1,200})"?', re.IGNORECASE)
_MODEL_PART = re.compile(
    rb'content-disposition:\s*form-data;\s*name="?model"?[ \t]*\r\n(?:[^\r\n]+\r\n)*\r\n',
    re.IGNORECASE,
)
MAX_MODEL = 256


def boundary_of(content_type: str) -> bytes:
    if not content_type.lower().startswith("multipart/form-data"):
        raise ApiError(400, "send the audio as multipart/form-data", code="invalid_request")
    match = _BOUNDARY.search(content_type)
    if match is None:
        raise ApiError(400, "the multipart body names no boundary", code="invalid_request")
    return match[1].encode()


def model_field(body: bytes, content_type: str) -> tuple[str, slice]:
    """The `model` form field's value and where it lies in the body."""
    delimiter = b"\r\n--" + boundary_of(content_type)
    found = _MODEL_PART.search(body)
    if found is None:
        raise ApiError(400, "`model` is required", param="model", code="missing_model")
    end = body.find(delimiter, found.end(), found.end() + MAX_MODEL + len(delimiter))
    if end < 0:
        raise ApiError(400, "the `model` field is not valid", param="model", code="missing_model")
    try:
        return body[found.end() : end].decode().strip(), slice(found.end(), end)
    except UnicodeDecodeError:
        raise ApiError(400, "the `model` field is not UTF-8", param="model") from None


def renamed(body: bytes, where: slice, target: str) -> bytes:
    """The body with the model field set to the upstream's name (an alias)."""
    return body[: where.start] + target.encode() + body[where.stop :]
