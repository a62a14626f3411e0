"""The aiohttp engine: the same request flow on aiohttp's low-level `web.Server`.

The battle-tested stack the project's design names, for operators who
prefer it to our own protocol (`--http aiohttp`), and a second, independent
implementation the tests compare the lean engine with. The flow is our
router, so no `web.Application` router sits in between: one handler turns
each request into `RequestFlow.respond` arguments and the decision into a
`web.Response`; aiohttp parses, queues pipelined requests and renders the
wire format (status line, Date, keep-alive) itself.

aiohttp honours some settings on its own, and answers differently at their
edges (the settings table says which): the request target (its
`max_line_size` bounds the target, as ours does, but answers 400 rather
than 414), header size (each name and value, 400 rather than 431),
keep-alive and pipelining (it pauses reading at 32 queued requests,
aiohttp 3.14). It has no connection limit, no header deadline and no
lingering close, and it closes on a client's FIN. So each connection runs
through `_TrackedConnection`, which stands between aiohttp's connection
handler and the socket, without patching aiohttp:

- to the socket's transport it is the protocol: it forwards every event to
  aiohttp's handler and reports the connection's state to the same
  `ConnectionTracker` the lean engine uses. A connection is BUSY while
  aiohttp holds a request it parsed and has not answered (its count of
  parsed requests against the answers its access-logger hook reports), so
  requests aiohttp has queued are never taken for an idle connection;
- to aiohttp's handler it is the transport: writes go through, and a
  `close()` becomes our lingering close (connections.py, `Lingering`);
- a FIN from the client keeps our side open until every request received
  before it is answered;
- it hands aiohttp pipelined input one request head at a time, so that a
  malformed request cannot cost the valid ones before it their answers
  (see `data_received`).

Reading aiohttp's count of parsed requests (`RequestHandler._request_count`)
is the one place we rely on a private attribute; aiohttp is pinned to 3.14
and the tests of queued requests fail if it changes.

Latency and access lines are taken as on the lean engine: a request's
time starts with the read its connection last received before aiohttp
called our handler (the read that completed it, unless the client sent
more behind it), and ends when aiohttp reports the response sent (its
access-logger hook runs once the response is written to the transport).
The bytes an access line reports are those aiohttp wrote for that
response (head and body), as its writer of that response counted them.
"""

from __future__ import annotations

import asyncio
import logging
from random import random as _random
from time import perf_counter as _clock
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.compression_utils import MAX_SYNC_CHUNK_SIZE
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_response import REASON_PHRASES
from multidict import CIMultiDict

from ..logs import AccessLine, RequestFacts
from ..routing import Decision, LocalAnswer
from .answers import ERRORS, UNAVAILABLE, http_date
from .connections import BUSY, IDLE, ConnectionTracker, Lingering
from .hosts import GOOD as GOOD_HOSTS
from .hosts import valid_host

if TYPE_CHECKING:
    from ..app import RequestFlow
    from ..config import Settings

log = logging.getLogger("archeio.http")

# Redirect headers kept at most (as the lean engine's rendered redirects): a
# flood of distinct decisions empties the table, no more.
_MAX_REDIRECTS = 4096


class _Answer(web.Response):
    """A response of our handler (aiohttp's own refusals are plain `web.Response`s).

    It carries what is done once it is sent: the list its latency is
    appended to, which counts it (None: not counted, its client had gone),
    when its request was complete, its sampled access line, and its
    connection (None: aiohttp's server runs without ours, in tests).
    """

    answers: list[float] | None = None
    started = 0.0
    line: AccessLine | None = None
    conn: _TrackedConnection | None = None
    _zlib_executor_size = MAX_SYNC_CHUNK_SIZE
    _zlib_executor = None

    def __init__(self, status: int, headers: CIMultiDict[str], body: bytes | None = None) -> None:
        # What `web.Response(status=, headers=, body=)` leaves for a bytes body
        # (or none) and neither text nor a content type, without its checks of
        # how those combine: that constructor was a fifth of aiohttp's own
        # work for a redirect. tests/test_aiohttp_answers.py compares the two
        # field by field, so an aiohttp that builds responses otherwise fails it.
        # `headers` becomes the response's own: aiohttp adds to them.
        self._state = {}
        self._headers = headers
        self._status = status
        self._reason = REASON_PHRASES.get(status, "")
        self._body = body


class _TrackedConnection(asyncio.Protocol):
    """One client connection: the socket's protocol, and the transport aiohttp's handler sees."""

    # `write`, `is_closing` and `get_extra_info` are the transport's own (C)
    # methods while it is open, so aiohttp's writer calls them without a
    # Python frame of ours between; `_closed` swaps them when closing starts.
    __slots__ = ("state", "last_active", "engine", "tracker", "inner", "transport", "answered", "partial", "eof",
                 "closing", "linger", "suspect", "made", "read_at", "peer", "write", "is_closing", "get_extra_info")

    def __init__(self, engine: AiohttpEngine) -> None:
        self.state = IDLE
        self.last_active = 0.0
        self.engine = engine
        self.tracker = engine.tracker
        self.inner = engine.server()
        self.transport: asyncio.Transport | None = None
        self.answered = 0  # responses aiohttp has sent on this connection
        self.partial = False  # input has arrived that is not yet a whole request
        self.eof = False  # the client shut its sending side
        self.closing = False  # aiohttp asked to close
        self.linger: Lingering | None = None
        # The client may still be sending: it pipelined, or a request was
        # refused. Closing then lingers; otherwise it closes at once (as
        # nginx's lingering_close "on" decides).
        self.suspect = False
        self.made = False
        self.read_at = 0.0  # when the last read began
        self.peer: str | None | bool = False  # `request.remote`, once read (False: not yet)
        self.write = self.is_closing = self.get_extra_info = None  # type: ignore[assignment]

    # -- the socket's side ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if not self.tracker.admit(self):
            transport.close()
            self.transport = None
            return
        self.made = True
        self.write = transport.write  # type: ignore[attr-defined]
        self.is_closing = transport.is_closing
        self.get_extra_info = transport.get_extra_info
        self.inner.connection_made(self)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            if self.linger is not None:
                self.linger.received(len(data))
            return
        self.read_at = _clock()
        inner = self.inner
        parsed = inner._request_count
        # aiohttp parses a whole read at once and, if any of it is malformed,
        # replaces every request parsed from that read with its one 400:
        # valid requests before the bad one would lose their answers. Handed
        # one request head at a time (as a slow network could), it queues
        # each valid request before it meets the bad one.
        end = data.find(b"\r\n\r\n") + 4
        if 3 < end < len(data):
            self.suspect = True  # more than a request in one read: a pipelining client
            start = 0
            while 3 < end < len(data):
                inner.data_received(data[start:end])
                start, end = end, data.find(b"\r\n\r\n", end) + 4
            parsed_before_last = inner._request_count
            inner.data_received(data[start:])
            self.partial = inner._request_count == parsed_before_last
        else:
            inner.data_received(data)
            self.partial = inner._request_count == parsed
        if self.transport is None:
            return
        if inner._request_count > self.answered:
            if self.state == IDLE:  # tracker.accepted(self), inline for a kept-alive connection's next request
                self.tracker.idle_leave(self)
                self.state = BUSY
            else:
                self.tracker.accepted(self)
        elif self.state == IDLE and self.partial:
            self.tracker.reading(self)

    def eof_received(self) -> bool | None:
        if self.linger is not None:
            self.linger.close()  # it has read its answers and closes: so do we
            return None
        self.eof = True
        if self.inner._request_count > self.answered:
            return True  # answers are owed: keep our sending side open for them
        return None  # nothing owed: the transport closes, and aiohttp hears of it

    def connection_lost(self, exc: Exception | None) -> None:
        self.tracker.remove(self)
        self.transport = None
        self._closed()
        self.get_extra_info = _no_extra_info
        if self.made:
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def sent(self, body_pending: bool, refused: bool) -> None:
        """aiohttp has handed a response to the transport; `body_pending`: its request's body is not all here.

        (`AiohttpEngine.response_sent` does this inline for its own answers.)
        """
        self.answered += 1
        if refused or body_pending:
            self.suspect = True
        if self.transport is None or self.linger is not None:
            return
        if self.inner._request_count > self.answered:
            return  # still BUSY: more parsed requests wait for their answers
        if self.eof:
            self._end(linger=False)  # half-closed and all answered: the end
        else:
            # A body still arriving keeps the header deadline running, as a head does.
            self.tracker.answered(self, self.partial or body_pending)

    # -- the tracker's side -----------------------------------------------------------

    def close_now(self, reason: str) -> None:
        self.linger = None
        self._closed()
        if self.transport is not None:
            log.debug("closing connection: %s", reason)
            self.transport.close()
        self.tracker.remove(self)

    def finish(self) -> None:
        """Close gracefully, everything owed handed over (the tracker's call at shutdown).

        It lingers: the client of a kept-alive connection may be sending a
        request at this very moment.
        """
        self._end(linger=True)

    def _end(self, linger: bool) -> None:
        transport = self.transport
        if transport is None or self.linger is not None:
            return
        self._closed()
        if linger and not self.eof:
            self.linger = Lingering(self, self.tracker, transport)
        else:  # nothing more is coming: it shut its side, or sent one last request and waits
            self.tracker.remove(self)
            transport.close()

    # -- aiohttp's side: the transport it writes to -----------------------------------

    def _closed(self) -> None:
        """From now on aiohttp sees a closing transport that writes nothing (our closing, or the socket's end)."""
        self.closing = True
        self.write = _discard
        self.is_closing = _closing

    def writelines(self, lines: Any) -> None:
        if not self.closing and self.transport is not None:
            self.transport.writelines(lines)

    def close(self) -> None:
        """aiohttp closes the connection: after its last answer, or on an error."""
        if not self.closing:
            self._end(linger=self.suspect or self.partial or self.inner._request_count > self.answered)

    def abort(self) -> None:
        self.close_now("aborted by aiohttp")

    def pause_reading(self) -> None:
        if self.transport is not None and self.linger is None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and self.linger is None and not self.eof:
            self.transport.resume_reading()

    def is_reading(self) -> bool:
        return self.transport is not None and self.transport.is_reading()

    def get_write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self.transport is not None:
            self.transport.set_write_buffer_limits(high, low)

    def can_write_eof(self) -> bool:
        return False  # ours to do, when closing


def _discard(data: bytes) -> None:
    """The write of a closing connection: aiohttp checks `is_closing` first, so nothing arrives here."""


def _closing() -> bool:
    return True


def _no_extra_info(name: str, default: Any = None) -> Any:
    return default


class _ClientErrors(logging.Filter):
    """Drops aiohttp's error log of a request it could not parse: the client's fault, not ours.

    aiohttp logs each one at ERROR with a traceback (only a first bad method
    at DEBUG); on a port open to the internet that is a flood of noise. Each
    is still answered 400 and counted (`archeio_requests{kind="http"}`), as
    the lean engine counts its refusals without logging them.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, HttpProcessingError)


_server_log = logging.getLogger("archeio.http.aiohttp")
_server_log.addFilter(_ClientErrors())


def _access_hook(engine: AiohttpEngine) -> type[AbstractAccessLogger]:
    class ResponseSent(AbstractAccessLogger):
        """aiohttp calls `log` once per response it sent: our refusals and state hook.

        `log` is the engine's `response_sent` itself, an attribute of the
        instance: aiohttp calls it with no frame of ours between.
        """

        def __init__(self, logger: logging.Logger, log_format: str) -> None:
            super().__init__(logger, log_format)
            self.log = engine.response_sent  # type: ignore[method-assign]

        def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
            engine.response_sent(request, response, time)

        @property
        def enabled(self) -> bool:
            return True

    return ResponseSent


class AiohttpEngine:
    """The public port served by aiohttp's `web.Server` with our request flow."""

    name = "aiohttp"

    def __init__(self, flow: RequestFlow, settings: Settings, loop: asyncio.AbstractEventLoop) -> None:
        self.flow = flow
        self.loop = loop
        self.tracker = ConnectionTracker.from_settings(loop, settings)
        self._time = loop.time
        # Decision -> its 307's headers, Date included (aiohttp then adds no
        # Date of its own), kept until `tick` changes the Date: the flow hands
        # out the same decision for the same route and mirror.
        self._date = http_date()
        self._redirects: dict[Decision, CIMultiDict[str]] = {}
        self.access_share = settings.access_log
        self.server = web.Server(
            self._handle,
            keepalive_timeout=settings.keepalive_timeout,
            # How long aiohttp waits for the rest of a body its handler did not
            # read (10 s by its default): a body has the header deadline, as a head.
            lingering_time=settings.header_timeout,
            max_line_size=settings.max_request_line,
            max_field_size=settings.max_header_bytes,
            access_log_class=_access_hook(self),
            access_log=_server_log,
            logger=_server_log,
        )
        self._server: asyncio.AbstractServer | None = None

    async def start(self, sock: Any) -> None:
        self._server = await self.loop.create_server(lambda: _TrackedConnection(self), sock=sock)

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        flow = self.flow
        # The request's fields as aiohttp parsed them (its properties would
        # each cost a Python call), and the connection, ours unless a test
        # runs aiohttp's server alone.
        message = request._message
        conn = request._protocol.transport
        if type(conn) is _TrackedConnection:
            started = conn.read_at
            peer = conn.peer
            if peer is False:
                peer = conn.peer = request.remote
        else:
            conn, started, peer = None, _clock(), request.remote
        headers = message.headers
        host = headers.get("Host")
        if (host is None and message.version >= (1, 1)) or (
                host is not None and host not in GOOD_HOSTS and not valid_host(host)):
            # RFC 9112 3.2; aiohttp itself refuses a second Host line.
            flow.refused(400)
            response = self._counted(_local_response(ERRORS[400]), started, conn)
            response.force_close()
            return response
        target = message.path
        if not target.isascii():
            # aiohttp decodes the target as UTF-8 with surrogate escapes; the
            # flow reads raw bytes as latin-1 characters, as the lean engine
            # hands them over.
            target = target.encode("utf-8", "surrogateescape").decode("latin-1")
        path, _, query = target.partition("?")
        lines = headers.getall("X-Forwarded-For", None)
        forwarded = None
        if lines:
            forwarded = ",".join(lines)
            if not forwarded.isascii():  # as the target: raw bytes as latin-1 characters
                forwarded = forwarded.encode("utf-8", "surrogateescape").decode("latin-1")
        try:
            outcome = flow.respond(
                message.method, path, query, forwarded, peer,
                _facts(message) if self.access_share and _random() < self.access_share else None,
            )
            if type(outcome) is Decision:  # self._counted(_redirect(outcome.location), ...), inline
                headers = self._redirects.get(outcome)
                if headers is None:
                    headers = self._redirect_headers(outcome)
                response = _Answer(307, headers.copy())
                response.answers, response.started, response.conn = flow.last_answer, started, conn
                # What aiohttp would ask of `request.keep_alive` (a property
                # call) when it prepares the response; `force_close` overrides it.
                response._keep_alive = not message.should_close
                if flow.sampled is not None:
                    response.line, flow.sampled = flow.sampled, None
            elif type(outcome) is LocalAnswer:
                response = self._counted(_local_response(outcome), started, conn)
            else:
                response = await self._after_check(request, outcome, started, conn)
        except Exception:  # a bug, never the client's fault: log it, answer 503 (as httptools_impl)
            log.exception("request flow failed unexpectedly")
            flow.refused(503)
            response = self._counted(_local_response(UNAVAILABLE), started, conn)
        if self.tracker.closing:
            # Shutting down: the last request aiohttp holds is answered with
            # `Connection: close` (aiohttp would drop the ones queued after it).
            if conn is None or conn.inner._request_count <= conn.answered + 1:
                response.force_close()
        return response

    async def _after_check(self, request: web.BaseRequest, pending: Any, started: float,
                           conn: _TrackedConnection | None) -> _Answer:
        task = asyncio.current_task()
        assert task is not None
        self.tracker.track(task)
        self.tracker.awaiting_check += 1
        try:
            decision = await self.flow.respond_after_check(pending)
        finally:
            self.tracker.awaiting_check -= 1
        if request.transport is None:  # the client has gone: nothing handed over, nothing counted
            return _redirect(decision.location)
        self.flow.delivered(pending, decision)
        return self._counted(_redirect(decision.location), started, conn)

    def _redirect_headers(self, decision: Decision) -> CIMultiDict[str]:
        if len(self._redirects) >= _MAX_REDIRECTS:
            self._redirects.clear()
        headers = self._redirects[decision] = _redirect(decision.location)._headers
        headers["Date"] = self._date
        return headers

    def _counted(self, response: _Answer, started: float, conn: _TrackedConnection | None) -> _Answer:
        """`response` is the answer the flow decided last: counted with its latency once it is sent."""
        flow = self.flow
        response.answers, response.started, response.conn = flow.last_answer, started, conn
        if flow.sampled is not None:
            response.line, flow.sampled = flow.sampled, None
        return response

    def response_sent(self, request: web.BaseRequest, response: web.StreamResponse, time: float = 0.0) -> None:
        """aiohttp has handed `response` to the transport (its access logger's `log`): count it, move the state."""
        if type(response) is _Answer:
            answers = response.answers
            if answers is not None:
                took = _clock() - response.started
                answers.append(took)
                if response.line is not None:
                    # What aiohttp's writer of this response wrote: head and body.
                    response.line.emit(response.body_length, took)
            conn = response.conn
            if conn is None:
                return
            payload = request._payload
            body_pending = payload is not EMPTY_PAYLOAD and not payload.is_eof()
            # conn.sent(body_pending, refused), inline; a kept-alive
            # connection's state BUSY -> IDLE as tracker.answered makes it.
            conn.answered += 1
            if body_pending or response._status == 400:
                conn.suspect = True
            if conn.closing or conn.transport is None:
                return
            if conn.inner._request_count > conn.answered:
                return  # still BUSY: more parsed requests wait for their answers
            tracker = self.tracker
            if conn.eof:
                conn._end(linger=False)  # half-closed and all answered: the end
            elif conn.state == BUSY and not (conn.partial or body_pending or tracker.closing):
                conn.state = IDLE
                conn.last_active = self._time()
                tracker.idle_join(conn, None)
            else:
                # A body still arriving keeps the header deadline running, as a head does.
                tracker.answered(conn, conn.partial or body_pending)
            return
        # aiohttp's own refusal of what it could not parse
        flow = self.flow
        flow.refused(response.status)
        transport = request.transport
        tracked = type(transport) is _TrackedConnection
        flow.last_answer.append(_clock() - (transport.read_at if tracked else _clock()))  # type: ignore[union-attr]
        if tracked:
            transport.sent(not request.content.is_eof(), True)  # type: ignore[union-attr]

    def tick(self) -> None:
        """Once a second: a new Date for the redirects, and the tracker's deadlines."""
        self._date = http_date()
        self._redirects.clear()
        self.tracker.sweep()

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def shutdown(self, grace: float) -> None:
        """Idle connections close now; the others get `grace` seconds for their answers."""
        await self.tracker.shutdown(grace, self.server.shutdown)


def _facts(message: RawRequestMessage) -> RequestFacts:
    """What an access line reads of the request, as the raw bytes the lean engine hands over."""
    headers = message.headers
    trace, agent = headers.get("X-Cloud-Trace-Context"), headers.get("User-Agent")
    return RequestFacts(
        # aiohttp decoded the bytes as UTF-8 with surrogate escapes: undone.
        None if trace is None else trace.encode("utf-8", "surrogateescape"),
        None if agent is None else agent.encode("utf-8", "surrogateescape"),
        f"HTTP/{message.version.major}.{message.version.minor}",
    )


def _redirect(location: str) -> _Answer:
    # Content-Length said explicitly: aiohttp leaves it out of a bodiless HEAD
    # answer. (Leaving it to aiohttp for a GET measured more work, not less:
    # its own path reads the status through a property.)
    return _Answer(307, CIMultiDict(Location=location, **{"Content-Length": "0"}))


def _local_response(answer: LocalAnswer) -> _Answer:
    headers: dict[str, str] = dict(answer.headers)
    headers["Content-Length"] = str(len(answer.body))
    if answer.location is not None:
        headers["Location"] = answer.location
    if answer.content_type is not None:
        headers["Content-Type"] = answer.content_type
    return _Answer(answer.status, CIMultiDict(headers), answer.body)
