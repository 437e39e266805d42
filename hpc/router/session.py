"""One relay connection in the agent: its frames, its request streams, its memory bound.

What one connection may make the agent hold, whatever the hub sends: at most
`max_streams` open streams (MAX_STREAMS), and request heads and bodies of at most its byte
budget, max(MIN_BODY_BUDGET, 4 * router.max_body_bytes), where a head counts its bytes
plus HEAD_COST plus PAIR_COST per header. The excess is refused per stream with a
retryable 503. Answers the hub does not read are bounded by `saia.base.mux` (CONTROL_QUEUE).
An upload (`hpc.router.upload`) is not held whole: its request starts at the head and
takes the body as it arrives, credit returned as the backend takes it (at most the
stream's window waits here).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Protocol

from hpc.config import AgentConfig
from hpc.router.forwarding import Rejection, error_body
from hpc.router.upload import Upload, streams_in
from saia.base import mux
from saia.base import protocol as wire
from saia.base.handover import RETIRING_HEADER
from saia.base.mux import Channel, StreamClosed, StreamState

log = logging.getLogger(__name__)

MAX_STREAMS = 8192  # concurrent streams per channel (5000 long streams on one: issue 16)
MIN_BODY_BUDGET = 64 * 1024 * 1024  # request bytes (heads and bodies) one connection may hold
# Charged per stream on top of its head's bytes: the parsed objects (measured: a header
# pair costs a tuple and two str objects, about 160 bytes even when both are empty).
HEAD_COST = 1024
PAIR_COST = 160
JSON_HEADERS = [("content-type", "application/json")]


class Answerer(Protocol):
    """What a session needs of the router (`hpc.router.server.Router`)."""

    max_streams: int
    min_budget: int
    retiring: bool  # the agent is stopping: new streams go to the next agent

    @property
    def config(self) -> AgentConfig: ...

    async def answer(
        self, sink: StreamSink, head: wire.RequestHead, body: bytes | Upload
    ) -> None: ...


class StreamSink:
    """A `ResponseSink` writing one stream's answer as frames."""

    def __init__(self, channel: Channel, state: StreamState) -> None:
        self._channel, self._state = channel, state
        self.started = False

    def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        self.started = True
        self._channel.send(wire.encode_response(self._state.id, wire.ResponseHead(status, headers)))

    async def send(self, data: bytes) -> None:
        await self._channel.send_data(self._state, data)

    def finish(self) -> None:
        self._channel.send(wire.encode_end(self._state.id))

    def fail(self, status: int, code: str, message: str) -> None:
        self._channel.send(wire.encode_error(self._state.id, status, code, message))

    async def reply(self, status: int, body: bytes, headers: list[tuple[str, str]]) -> None:
        self.start(status, headers)
        await self.send(body)
        self.finish()


async def answer_rejection(sink: StreamSink, rejection: Rejection) -> None:
    """An OpenAI error JSON response (or an ERROR frame if the response started)."""
    if sink.started:
        sink.fail(rejection.status, rejection.code, str(rejection))
        return
    kind = "invalid_request_error" if rejection.status < 500 else "service_unavailable"
    headers = list(JSON_HEADERS)
    if rejection.retry_after:
        headers.append(("retry-after", rejection.retry_after))
    body = error_body(str(rejection), kind, rejection.code)
    await sink.reply(rejection.status, body, headers)


class Incoming:
    """A request stream whose body is still arriving."""

    __slots__ = ("body", "cost", "head", "refusal", "state", "upload")

    def __init__(self, state: StreamState, head: wire.RequestHead | None, cost: int) -> None:
        self.state, self.head = state, head
        self.body: bytes | bytearray = b""  # a one-frame body is kept as is (no copies)
        self.cost = cost  # bytes charged to the session's budget (head and body)
        self.refusal: Rejection | None = None  # answered at END; the body is not kept
        self.upload: Upload | None = None  # a body passed on as it arrives


class Session:
    """One relay connection: decodes frames and runs one task per request stream.

    Its memory is bounded whatever the hub sends: at most `router.max_streams` open
    streams (counted at REQUEST: the excess is refused with a 503 without keeping any
    state), and heads (plus HEAD_COST each) and bodies of at most `budget` bytes. Past
    half the budget, credit is withheld (uploads wait, except the oldest); data that
    would pass the budget is dropped and its stream answered 503 at END. Refusals are per
    stream, not a closed channel: a hub under load is not an attacker, and its other
    streams go on.
    """

    def __init__(self, router: Answerer, channel: Channel) -> None:
        self.router, self.channel = router, channel
        self.incoming: dict[int, Incoming] = {}  # buffered bodies still arriving
        self.uploads: dict[int, Incoming] = {}  # streamed bodies still arriving
        self.answering: dict[int, Incoming] = {}  # streams whose task was made
        self.last_id = 0
        self.tasks: asyncio.TaskGroup | None = None
        self.budget = max(router.min_budget, 4 * router.config.router.max_body_bytes)
        self.held = 0
        self.withheld: dict[StreamState, int] = {}  # credit not yet returned, per stream

    async def run(self) -> None:
        channel, owed_limit = self.channel, mux.CONTROL_QUEUE
        violation: wire.ProtocolError | None = None
        async with asyncio.TaskGroup() as tasks:
            self.tasks = tasks
            try:
                while (frames := await channel.next_frames()) is not None:
                    for frame in frames:
                        self.dispatch(frame)
                        if channel.owed >= owed_limit:  # refusals nobody reads
                            await channel.wait_drained()
            except wire.ProtocolError as error:  # raised after the group, not wrapped by it
                violation = error
            finally:  # the client is gone (or broke the protocol): drop its streams
                for state in list(self.channel.streams.values()):
                    if state.task is not None:
                        state.task.cancel()
        if violation is not None:
            raise violation

    def dispatch(self, frame: wire.Frame) -> None:
        kind, stream = frame.type, frame.stream
        if kind == wire.REQUEST:
            self.open(frame)
            return
        if kind not in (wire.DATA, wire.END, wire.CANCEL):
            raise wire.ProtocolError(f"a client may not send {wire.describe(frame)}")
        if stream > self.last_id:
            raise wire.ProtocolError(f"{wire.describe(frame)} on a stream never opened")
        state = self.channel.streams.get(stream)
        if state is None:  # answered, refused or cancelled: late frames are harmless,
            if kind == wire.DATA:  # but a sender waiting for credit would hang: grant it
                self.channel.answer(wire.encode_window(stream, len(frame.payload)))
            return
        if kind == wire.CANCEL:
            if state.task is not None:
                state.task.cancel()
            self.forget(stream)
            self.channel.discard(state)
        elif kind == wire.DATA:
            self.receive(state, frame.payload)
        else:
            self.start(stream)

    def open(self, frame: wire.Frame) -> None:
        stream = frame.stream
        if stream <= self.last_id:
            raise wire.ProtocolError(f"stream id {stream} reused")
        self.last_id = stream
        if self.router.retiring:
            retry = [(RETIRING_HEADER, "1")]  # the hub resends it on a new connection
            self.refuse(stream, "agent_restarting", "the agent is restarting", retry)
            return
        if len(self.channel.streams) >= self.router.max_streams:
            self.refuse(stream, "too_many_streams", "too many concurrent requests")
            return
        try:
            head: wire.RequestHead | None = wire.parse_request(frame.payload)
        except wire.ProtocolError as error:
            log.info("bad request head on stream %d: %s", stream, error)
            head = None
        pairs = len(head.headers) if head is not None else 0
        cost = len(frame.payload) + HEAD_COST + PAIR_COST * pairs
        if self.held + cost > self.budget:
            self.refuse(stream, "agent_busy", "the agent holds too many request bodies")
            return
        self.held += cost
        incoming = Incoming(self.channel.open(stream), head, cost)
        if streams_in(head):  # an upload: its request starts now, the body follows
            incoming.upload = Upload(functools.partial(self.taken, incoming))
            self.uploads[stream] = self.answering[stream] = incoming
            assert self.tasks is not None
            incoming.state.task = self.tasks.create_task(self.serve(incoming))
        else:
            self.incoming[stream] = incoming

    def refuse(
        self, stream: int, code: str, message: str, extra: list[tuple[str, str]] | None = None
    ) -> None:
        """A retryable 503 for a stream never opened (no state kept; counted by the mux)."""
        headers = [*JSON_HEADERS, ("retry-after", "1"), *(extra or [])]
        body = error_body(message, "service_unavailable", code)
        self.channel.answer(
            wire.encode_response(stream, wire.ResponseHead(503, headers))
            + wire.encode_data(stream, body)
            + wire.encode_end(stream)
        )

    def receive(self, state: StreamState, data: bytes) -> None:
        incoming = self.incoming.get(state.id)
        if incoming is None:
            upload = self.uploads.get(state.id)
            if upload is None or upload.upload is None:
                raise wire.ProtocolError(f"DATA after END on stream {state.id}")
            self.stream_in(upload, upload.upload, data)
            return
        size = len(data)
        if incoming.refusal is None:
            if len(incoming.body) + size > self.router.config.router.max_body_bytes:
                limit = self.router.config.router.max_body_bytes
                self.drop(
                    incoming, Rejection(413, "request_too_large", f"the body exceeds {limit} bytes")
                )
            elif self.held + size > self.budget:
                busy = "the agent holds too many request bodies"
                self.drop(incoming, Rejection(503, "agent_busy", busy, "1"))
        if incoming.refusal is not None:
            self.channel.consumed(state, size)  # discarded at once
            return
        if not incoming.body:
            incoming.body = data
        elif isinstance(incoming.body, bytes):
            incoming.body = bytearray(incoming.body) + data
        else:
            incoming.body += data
        incoming.cost += size
        self.held += size
        if self.held <= self.budget // 2 or state.id == next(iter(self.incoming)):
            self.channel.consumed(state, size)
        else:  # let the sender wait rather than pass the budget
            self.withheld[state] = self.withheld.get(state, 0) + size

    def stream_in(self, incoming: Incoming, upload: Upload, data: bytes) -> None:
        """An upload's DATA, passed on as the backend request takes it (`taken`); the 413
        limit and the budget apply as to a buffered body, the refusal raised by the pull."""
        size, limit = len(data), self.router.config.router.max_body_bytes
        if incoming.refusal is None:
            if upload.received + size > limit:
                message = f"the body exceeds {limit} bytes"
                self.refuse_upload(incoming, upload, Rejection(413, "request_too_large", message))
            elif self.held + size > self.budget:
                busy = "the agent holds too many request bodies"
                self.refuse_upload(incoming, upload, Rejection(503, "agent_busy", busy, "1"))
        if incoming.refusal is not None:
            self.channel.consumed(incoming.state, size)  # discarded at once
            return
        upload.put(data)
        incoming.cost += size
        self.held += size

    def refuse_upload(self, incoming: Incoming, upload: Upload, refusal: Rejection) -> None:
        incoming.refusal = refusal
        dropped = upload.fail(refusal)
        incoming.cost -= dropped
        self.held -= dropped
        self.channel.consumed(incoming.state, dropped)  # let the sender finish

    def taken(self, incoming: Incoming, size: int) -> None:
        """The backend request took `size` bytes of an upload: credit back to the hub."""
        incoming.cost -= size
        self.held -= size
        self.channel.consumed(incoming.state, size)

    def drop(self, incoming: Incoming, refusal: Rejection) -> None:
        """Keep no more of this body; answer `refusal` at END."""
        incoming.refusal = refusal
        size = len(incoming.body)
        incoming.body = b""
        incoming.cost -= size
        self.held -= size
        withheld = self.withheld.pop(incoming.state, 0)
        if withheld:  # let the sender finish, so that it reads the answer
            self.channel.consumed(incoming.state, withheld)

    def release(self, incoming: Incoming) -> None:
        """A stream's head and body are no longer held: return withheld credit if room."""
        self.held -= incoming.cost
        incoming.cost = 0
        if self.withheld:
            self.withheld.pop(incoming.state, None)
            self.regrant()

    def regrant(self) -> None:
        """Return withheld credit while within half the budget. The oldest upload always
        gets its own back: were every upload waiting, none would end to release room."""
        withheld = self.withheld
        while withheld and self.held <= self.budget // 2:
            state = next(iter(withheld))
            self.channel.consumed(state, withheld.pop(state))
        if withheld and self.incoming:
            oldest = next(iter(self.incoming.values())).state
            if size := withheld.pop(oldest, 0):
                self.channel.consumed(oldest, size)

    def start(self, stream: int) -> None:
        incoming = self.incoming.pop(stream, None)
        if incoming is None:
            upload = self.uploads.pop(stream, None)
            if upload is None or upload.upload is None:
                raise wire.ProtocolError(f"second END on stream {stream}")
            upload.upload.end()  # its request runs since the head
            return
        if self.withheld:
            self.withheld.pop(incoming.state, None)  # no more DATA may come
            self.regrant()  # a new oldest upload
        assert self.tasks is not None
        self.answering[stream] = incoming
        incoming.state.task = self.tasks.create_task(self.serve(incoming))

    def forget(self, stream: int) -> None:
        """A cancelled stream holds nothing more. Released here, not only by its task: a
        task cancelled before it ran never runs its own cleanup (END and CANCEL in one
        read, from a client that left just after sending)."""
        for table in (self.incoming, self.uploads, self.answering):
            incoming = table.pop(stream, None)
            if incoming is not None:
                self.release(incoming)  # once: it zeroes what the stream is charged

    async def serve(self, incoming: Incoming) -> None:
        """One request's task: never raises (the session's other streams go on)."""
        sink = StreamSink(self.channel, incoming.state)
        try:
            try:
                await self.checked_answer(sink, incoming)
            except Rejection as rejection:
                await answer_rejection(sink, rejection)
            except (StreamClosed, asyncio.CancelledError):
                raise
            except Exception:
                log.exception("request on stream %d failed", incoming.state.id)
                failure = Rejection(500, "internal_error", "the agent failed while answering")
                await answer_rejection(sink, failure)
        except StreamClosed:
            pass
        finally:
            self.answering.pop(incoming.state.id, None)
            self.release(incoming)
            self.channel.discard(incoming.state)
            if incoming.upload is not None:
                self.finish_upload(incoming, incoming.upload)

    def finish_upload(self, incoming: Incoming, upload: Upload) -> None:
        """An upload's request ended (maybe before its body did: DATA that still comes
        gets credit, unread, in `dispatch`)."""
        if self.uploads.get(incoming.state.id) is incoming:
            del self.uploads[incoming.state.id]
        upload.fail(asyncio.CancelledError())  # nothing more is kept
        log.info(
            "upload on stream %d: %d bytes received, at most %d held at once",
            incoming.state.id,
            upload.received,
            upload.peak,
        )

    async def checked_answer(self, sink: StreamSink, incoming: Incoming) -> None:
        if incoming.head is None:
            raise Rejection(400, "bad_request", "the request head is not valid")
        if incoming.upload is not None:
            await self.router.answer(sink, incoming.head, incoming.upload)
            return
        if incoming.refusal is not None:
            raise incoming.refusal
        body = incoming.body
        if type(body) is not bytes:
            body = incoming.body = bytes(body)  # one copy held, not two
        await self.router.answer(sink, incoming.head, body)
