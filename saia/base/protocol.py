"""The saia hop wire protocol: many concurrent request streams over one byte channel.

Stdlib only: the hub and the agent import it (with saia.base.mux on top); the relay on the
login node does not (it copies bytes and never parses frames).

A frame is a fixed 10-byte header followed by its payload:

    type u8 | flags u8 | stream id u32 | payload length u32     (big endian)

Both sides open with HELLO (stream 0, JSON {"protocol": "saia-relay", "version": 1}). The
client opens a stream with REQUEST (JSON head), sends the body as DATA frames and END. The
server answers with RESPONSE (JSON head), DATA frames and END, or ERROR (JSON) at any time.
CANCEL (client) abandons a stream. DATA is flow controlled per stream: each side may have
at most INITIAL_WINDOW unacknowledged payload bytes in flight; the receiver returns credit
with WINDOW (u32 increment) as its application consumes data. PING/PONG (stream 0) echo
an 8-byte payload. Everything a peer sends is validated: a malformed, oversized or
unexpected frame raises ProtocolError and the channel is closed. A server may answer a
REQUEST it cannot hold at once (e.g. 503 with retry-after) and ignore the rest of that
stream's frames; empty DATA frames carry nothing and may be dropped.
"""

from __future__ import annotations

import json
import re
import struct
from typing import Any, NamedTuple, TypeGuard

PROTOCOL = "saia-relay"
VERSION = 1

HELLO = 1
REQUEST = 2
DATA = 3
END = 4
RESPONSE = 5
ERROR = 6
CANCEL = 7
WINDOW = 8
PING = 9
PONG = 10
TYPE_NAMES = {
    HELLO: "HELLO",
    REQUEST: "REQUEST",
    DATA: "DATA",
    END: "END",
    RESPONSE: "RESPONSE",
    ERROR: "ERROR",
    CANCEL: "CANCEL",
    WINDOW: "WINDOW",
    PING: "PING",
    PONG: "PONG",
}

HEADER = struct.Struct(">BBII")
WINDOW_BODY = struct.Struct(">I")
MAX_DATA = 256 * 1024  # largest DATA payload
MAX_HEAD = 64 * 1024  # largest JSON head (REQUEST, RESPONSE, ERROR, HELLO)
MAX_HEADERS = 128
TRACEPARENT = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
MAX_STREAM_ID = 0xFFFFFFFF
INITIAL_WINDOW = 1024 * 1024  # per-stream credit in each direction
MAX_WINDOW = 64 * 1024 * 1024

_CONTROL = (HELLO, PING, PONG)  # frames on stream 0
_EXACT = {END: 0, CANCEL: 0, WINDOW: 4, PING: 8, PONG: 8}  # fixed-size payloads
_LIMITS = {
    HELLO: MAX_HEAD,
    REQUEST: MAX_HEAD,
    DATA: MAX_DATA,
    END: 0,
    RESPONSE: MAX_HEAD,
    ERROR: MAX_HEAD,
    CANCEL: 0,
    WINDOW: 4,
    PING: 8,
    PONG: 8,
}


class ProtocolError(Exception):
    """The peer sent something this protocol does not allow; close the channel."""


class Frame(NamedTuple):
    type: int
    stream: int
    payload: bytes
    flags: int = 0


class Caller(NamedTuple):
    """Who sent a request and its class, set by the hub from its own authentication.

    Only the hub writes these head fields (a client's headers cannot reach them), and the
    agent trusts them because the hop is its only way in. Empty: unknown (an older hub).
    """

    user: str = ""
    key: str = ""
    group: str = ""
    priority: str = ""  # request class: "" or "interactive", "batch"


class RequestHead(NamedTuple):
    service: str
    method: str
    path: str
    headers: list[tuple[str, str]]
    caller: Caller = Caller()
    # W3C trace context of the hub's span for this request ("" when not traced); the agent
    # trusts it only here, never from a client's HTTP headers.
    traceparent: str = ""


class ResponseHead(NamedTuple):
    status: int
    headers: list[tuple[str, str]]


class ErrorBody(NamedTuple):
    status: int
    code: str
    message: str


def encode_frame(kind: int, stream: int, payload: bytes = b"", flags: int = 0) -> bytes:
    limit = _LIMITS.get(kind)
    if limit is None:
        raise ValueError(f"unknown frame type {kind!r}")
    if len(payload) > limit or _EXACT.get(kind, len(payload)) != len(payload):
        raise ValueError(f"{TYPE_NAMES[kind]} payload of {len(payload)} bytes not allowed")
    return HEADER.pack(kind, flags, stream, len(payload)) + payload


def encode_data(stream: int, payload: bytes) -> bytes:
    """A DATA frame (the hot path: no table look-ups)."""
    if len(payload) > MAX_DATA:
        raise ValueError(f"DATA payload of {len(payload)} bytes not allowed")
    return HEADER.pack(DATA, 0, stream, len(payload)) + payload


def encode_end(stream: int) -> bytes:
    return HEADER.pack(END, 0, stream, 0)


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)  # one, not per call


def _json(value: Any) -> bytes:
    return _ENCODER.encode(value).encode("utf-8")


def encode_hello() -> bytes:
    return encode_frame(HELLO, 0, _json({"protocol": PROTOCOL, "version": VERSION}))


def encode_request(stream: int, head: RequestHead) -> bytes:
    body: dict[str, Any] = {
        "service": head.service,
        "method": head.method,
        "path": head.path,
        "headers": head.headers,  # pairs (tuples) encode as JSON arrays
    }
    if any(head.caller):
        body["caller"] = head.caller._asdict()
    if head.traceparent:
        body["traceparent"] = head.traceparent
    return encode_frame(REQUEST, stream, _json(body))


def encode_response(stream: int, head: ResponseHead) -> bytes:
    body = {"status": head.status, "headers": head.headers}
    return encode_frame(RESPONSE, stream, _json(body))


def encode_error(stream: int, status: int, code: str, message: str) -> bytes:
    text = message[:4096]
    return encode_frame(ERROR, stream, _json({"status": status, "code": code, "message": text}))


def encode_window(stream: int, increment: int) -> bytes:
    return encode_frame(WINDOW, stream, WINDOW_BODY.pack(increment))


class FrameDecoder:
    """Incremental decoder: feed() bytes as they arrive, get whole validated frames."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back (non-zero at EOF means truncation)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Frame]:
        buffer = self._buffer
        if buffer:  # a frame was cut off: continue it (otherwise parse `data` in place)
            buffer += data
            if len(buffer) >= HEADER.size:
                kind, flags, stream, length = HEADER.unpack_from(buffer)
                _check_header(kind, flags, stream, length)
                if len(buffer) < HEADER.size + length:
                    return []  # still incomplete: no copy
            data = bytes(buffer)
            buffer.clear()
        frames = []
        offset = 0
        size = len(data)
        unpack, header_size = HEADER.unpack_from, HEADER.size
        while size - offset >= header_size:
            kind, flags, stream, length = unpack(data, offset)
            if (kind == DATA and length <= MAX_DATA) or (kind == END and not length):
                if flags or not stream:  # the common frames, checked without look-ups
                    _check_header(kind, flags, stream, length)
            else:
                _check_header(kind, flags, stream, length)
            start = offset + header_size
            end = start + length
            if end > size:
                break
            frames.append(Frame(kind, stream, data[start:end], flags))
            offset = end
        if offset < size:
            buffer += data[offset:]
        return frames

    def finish(self) -> None:
        """The channel ended: complain if a frame was cut off."""
        if self._buffer:
            raise ProtocolError(f"channel closed inside a frame ({len(self._buffer)} bytes left)")


def _check_header(kind: int, flags: int, stream: int, length: int) -> None:
    limit = _LIMITS.get(kind)
    if limit is None:
        raise ProtocolError(f"unknown frame type {kind}")
    if flags:
        raise ProtocolError(f"{TYPE_NAMES[kind]} frame with unknown flags {flags}")
    if length > limit:
        raise ProtocolError(f"{TYPE_NAMES[kind]} frame of {length} bytes exceeds {limit}")
    if _EXACT.get(kind, length) != length:
        raise ProtocolError(f"{TYPE_NAMES[kind]} frame must carry {_EXACT[kind]} bytes")
    if kind != ERROR and (kind in _CONTROL) != (stream == 0):  # ERROR may be channel-wide
        raise ProtocolError(f"{TYPE_NAMES[kind]} frame on stream {stream}")


def _load_object(payload: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError(f"{what} head is not valid UTF-8 JSON") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} head is not a JSON object")
    return value


def _text(value: Any, what: str, limit: int) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise ProtocolError(f"{what} must be a string of at most {limit} characters")
    if "\r" in value or "\n" in value or "\x00" in value:
        raise ProtocolError(f"{what} contains a control character")
    return value


def _headers(value: Any) -> list[tuple[str, str]]:
    if not isinstance(value, list) or len(value) > MAX_HEADERS:
        raise ProtocolError(f"headers must be a list of at most {MAX_HEADERS} pairs")
    pairs = []
    for item in value:
        if not isinstance(item, list) or len(item) != 2:
            raise ProtocolError("each header must be a [name, value] pair")
        name, text = item
        if _plain(name, 256) and _plain(text, 16384):
            pairs.append((name, text))
        else:  # the slow path names the problem
            pairs.append((_text(name, "header name", 256), _text(text, "header value", 16384)))
    return pairs


def _plain(value: Any, limit: int) -> TypeGuard[str]:
    """`_text` without the error message: True if `value` passes it."""
    return (
        isinstance(value, str)
        and len(value) <= limit
        and "\n" not in value
        and "\r" not in value
        and "\x00" not in value
    )


def parse_hello(payload: bytes) -> int:
    """Return the peer's protocol version (the caller decides whether it speaks it)."""
    body = _load_object(payload, "HELLO")
    version = body.get("version")
    if body.get("protocol") != PROTOCOL or not isinstance(version, int):
        raise ProtocolError(f"HELLO does not announce the {PROTOCOL} protocol")
    return version


def parse_request(payload: bytes) -> RequestHead:
    body = _load_object(payload, "REQUEST")
    method, service, path = body.get("method"), body.get("service"), body.get("path")
    if not (_plain(method, 16) and _plain(service, 256) and _plain(path, 8192)):
        method = _text(method, "method", 16)  # the slow path names the problem
        service = _text(service, "service", 256)
        path = _text(path, "path", 8192)
    if not method.isalpha() or not method.isupper():
        raise ProtocolError("method must be upper-case letters")
    caller = _caller(body["caller"]) if "caller" in body else Caller()
    headers = _headers(body.get("headers", []))
    if "traceparent" not in body:
        return RequestHead(service, method, path, headers, caller)
    return RequestHead(service, method, path, headers, caller, _traceparent(body["traceparent"]))


def _traceparent(value: Any) -> str:
    if not isinstance(value, str) or not TRACEPARENT.fullmatch(value):
        raise ProtocolError("traceparent must be a W3C traceparent (version 00)")
    return value


def _caller(value: Any) -> Caller:
    if not isinstance(value, dict):
        raise ProtocolError("caller must be a JSON object")
    return Caller(*(_text(value.get(f, ""), f"caller {f}", 256) for f in Caller._fields))


def parse_response(payload: bytes) -> ResponseHead:
    body = _load_object(payload, "RESPONSE")
    status = body.get("status")
    if not isinstance(status, int) or not 100 <= status <= 599:
        raise ProtocolError("RESPONSE status must be an HTTP status code")
    return ResponseHead(status, _headers(body.get("headers", [])))


def parse_error(payload: bytes) -> ErrorBody:
    body = _load_object(payload, "ERROR")
    status = body.get("status")
    if not isinstance(status, int) or not 100 <= status <= 599:
        status = 502
    return ErrorBody(
        status,
        _text(body.get("code", "error"), "error code", 64),
        _text(body.get("message", ""), "error message", 4096),
    )


def parse_window(payload: bytes) -> int:
    (increment,) = WINDOW_BODY.unpack(payload)
    if increment == 0 or increment > MAX_WINDOW:
        raise ProtocolError(f"WINDOW increment {increment} out of range")
    return int(increment)


def describe(frame: Frame) -> str:
    """A short, log-safe description (never the payload: it may hold user data)."""
    return f"{TYPE_NAMES.get(frame.type, '?')} stream={frame.stream} len={len(frame.payload)}"
