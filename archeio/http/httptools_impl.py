"""The lean engine: our own HTTP/1.1 protocol on httptools, the default.

Why our own: every public answer is a tiny response to a GET or HEAD
without a body, and aiohttp's per-request machinery (request and response
objects, a task per request) costs several times the routing itself. This
protocol parses with httptools (the parser uvicorn uses), answers
synchronously whenever it can, and starts a task only when a blob needs an
existence check. docs/performance.md has the numbers behind this choice;
aiohttp_impl.py is the same flow on aiohttp's server.

Guarantees kept here (docs/reliability.md lists the tests):
- Answers leave in request order, whatever comes after them on the
  connection: requests parsed behind one that waits for a check are queued;
  a malformed request, an oversized one or bytes after a `Connection:
  close` request end the input, and the error answer (if any) is sent after
  every answer owed before it.
- A connection we end closes in stages (connections.py, `Lingering`): our
  FIN follows the last answer owed, then what the client still sends is
  read and discarded for a bounded time and amount, so no reset destroys
  answers it has not read yet.
- A client's FIN ends only its sending: every request received before it
  is answered, in order, then the connection closes.
- Nothing is buffered without limit: input is fed to the parser in slices
  of `SLICE` bytes; once `MAX_QUEUED` requests wait, reading pauses and the
  rest of the read is held until the queue drains (as aiohttp pauses).
- One client cannot hold the loop: at most `BUDGET` answers are given per
  turn of the event loop, then the connection yields.
- A request target over `max_request_line` bytes gets 414, headers over
  `max_header_bytes` 431 (counted exactly per header). A request in
  progress, its head, body and trailers together, may hold at most both
  limits plus the slice it began in (counted from that slice, so complete
  requests before it never count): past that, 431 while in its head, 413
  in its body. httptools keeps an unfinished header or trailer value in its
  parser, so the protocol counts these bytes itself as they are fed.
  Anything unparseable gets 400. Trailer fields are never read as header
  fields (RFC 9110 6.5.1).
- An HTTP/1.1 request without a `Host` header, with two, or with a value
  that is not a URI host and port, gets 400 (RFC 9112 3.2, hosts.py).
- `Expect: 100-continue` and `Upgrade` requests are answered at once, as
  plain HTTP/1.1 with `Connection: close`, and the connection closes after.
- An unexpected exception in the request flow or an existence check is
  logged and answered 503 UNAVAILABLE, counted, as on the aiohttp engine.
- Deadlines (the header deadline covers every request's head and body) and
  the connection limit: connections.py.

Answers are counted with their latency (`archeio_request_duration_seconds`,
metrics.py), from the start of the read callback that received a
request's last bytes to the write that hands its answer to the transport.
Synchronous answers are written at the end of the callback that parsed
them, so the clock is read twice a read, not twice a request: the
callback's last answer (the usual case: its only one) is appended to the
flow's `last_answer` after the write. Any other (an earlier one of a
pipelined read, a queued, refused or checked request's) is counted by
`_file` as it is rendered, in the same callback as its write, a few
microseconds before it.

With the access log on, the protocol is `_LoggingProtocol`, chosen at
start-up: it samples requests for the access log and keeps the User-Agent
and trace headers and the version for their lines, so the usual protocol
compares no header it does not route by.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from random import random as _random
from time import perf_counter as _clock
from typing import TYPE_CHECKING, Any

import httptools

from ..logs import RequestFacts
from ..routing import Decision, LocalAnswer
from .answers import ERRORS, UNAVAILABLE, http_date, reason
from .connections import BUSY, IDLE, ConnectionTracker, Lingering
from .hosts import GOOD as _GOOD_HOSTS
from .hosts import valid_host

if TYPE_CHECKING:
    from ..app import PendingCheck, RequestFlow
    from ..config import Settings

log = logging.getLogger("archeio.http")

_METHODS = {b"GET": "GET", b"HEAD": "HEAD"}
_XFF = b"x-forwarded-for"
_TRACE = b"x-cloud-trace-context"
_USER_AGENT = b"user-agent"
_EXPECT = b"expect"
_CONNECTION = b"connection"
_HOST = b"host"

# Bytes fed to the parser at a time: the granularity of pausing, and the
# slack of the unfinished-head limit.
SLICE = 8192
# Parsed requests waiting for their turn, at most, before reading pauses.
MAX_QUEUED = 64
# Answers given per turn of the event loop before the connection yields.
BUDGET = 32
# Raw request targets remembered as text (the table is emptied when full);
# longer ones are not remembered, like the router's paths.
_TARGETS_REMEMBERED = 4096
_TARGET_REMEMBERED_LENGTH = 512

# How an answer ends the exchange.
KEEP = 0  # HTTP/1.1 keep-alive: nothing to say
KEEP_1_0 = 1  # HTTP/1.0 keep-alive: must say so
CLOSE = 2

_CONNECTION_LINES = (b"", b"Connection: keep-alive\r\n", b"Connection: close\r\n")

# What the headers of the request being parsed said.
_KEEP_ALIVE_HEADER = 1  # Connection: keep-alive (matters for HTTP/1.0)
_EXPECT_HEADER = 2  # Expect: (100-continue)
_ANSWERED_EARLY = 4  # answered at its headers (Expect, Upgrade): nothing at its end
_IN_BODY = 16  # the head is complete: fields now are trailers



class _StopParsing(Exception):
    """Raised inside a parser callback to stop parsing (oversized, or input ended)."""


class Wire:
    """Renders decisions as HTTP/1.1 bytes, caching what does not change."""

    _MAX_CACHED = 4096

    def __init__(self) -> None:
        self.date = b""
        # Decision -> its keep-alive 307, rendered with the current Date.
        self._decided: dict[Decision, bytes] = {}
        # id(answer) -> (answer, its status line and headers up to the Date
        # line); the answer is kept so that a reused id cannot match.
        self._heads: dict[int, tuple[LocalAnswer, bytes]] = {}
        self.tick()

    def tick(self) -> None:
        """Refresh the Date header; the engine calls this every second."""
        self.date = b"Date: " + http_date().encode() + b"\r\n"
        self._decided.clear()

    def decided(self, decision: Decision, mode: int) -> bytes:
        """A decision's 307; the keep-alive rendering of each decision is kept until the Date changes.

        The flow hands out the same decision object for the same route and
        mirror, so popular blobs and manifests are rendered once a second.
        """
        if mode == KEEP:
            rendered = self._decided.get(decision)
            if rendered is None:
                if len(self._decided) >= self._MAX_CACHED:
                    self._decided.clear()
                rendered = self._decided[decision] = self.redirect(decision.location, KEEP)
            return rendered
        return self.redirect(decision.location, mode)

    def redirect(self, location: str, mode: int) -> bytes:
        return b"".join((
            b"HTTP/1.1 307 Temporary Redirect\r\nLocation: ",
            location.encode("ascii"),
            b"\r\nContent-Length: 0\r\n",
            self.date,
            _CONNECTION_LINES[mode],
            b"\r\n",
        ))

    def answer(self, answer: LocalAnswer, head: bool, mode: int) -> bytes:
        cached = self._heads.get(id(answer))
        if cached is not None and cached[0] is answer:
            lines = cached[1]
        else:
            if len(self._heads) >= self._MAX_CACHED:
                self._heads.clear()
            lines = _head_lines(answer)
            self._heads[id(answer)] = (answer, lines)
        return b"".join((lines, self.date, _CONNECTION_LINES[mode], b"\r\n", b"" if head else answer.body))


def _head_lines(answer: LocalAnswer) -> bytes:
    lines = [b"HTTP/1.1 %d %s\r\n" % (answer.status, reason(answer.status).encode())]
    if answer.location is not None:
        lines.append(b"Location: " + answer.location.encode("ascii") + b"\r\n")
    if answer.content_type is not None:
        lines.append(b"Content-Type: " + answer.content_type.encode("ascii") + b"\r\n")
    for name, value in answer.headers:
        lines.append(name.encode("ascii") + b": " + value.encode("ascii") + b"\r\n")
    lines.append(b"Content-Length: %d\r\n" % len(answer.body))
    return b"".join(lines)


# A parsed request waiting in line: (method, raw target, X-Forwarded-For,
# mode, the access line's facts, when the read that completed it began).
_Request = tuple[str, bytes, bytes | None, int, RequestFacts | None, float]


class HttpToolsProtocol(asyncio.Protocol):
    """One client connection of the public port."""

    __slots__ = (
        "state", "last_active", "_engine", "_flow", "_tracker", "_wire", "_targets", "_loop", "_transport",
        "_parser", "_peer", "_read_at",
        "_url", "_forwarded", "_facts", "_flags", "_host", "_known_host", "_header_bytes", "_refusal",
        "_began_at", "_fed", "_fed_before", "_queue", "_waiting",
        "_input_closed", "_eof", "_backlog", "_answered", "_turn_scheduled", "_reading_paused",
        "_writing_paused", "_out", "_close_after_flush", "_linger_close", "_linger",
    )

    def __init__(self, engine: HttpToolsEngine) -> None:
        self.state = IDLE
        self.last_active = 0.0
        self._engine = engine
        self._flow = engine.flow
        self._tracker = engine.tracker
        self._wire = engine.wire
        self._targets = engine.targets
        self._loop = engine.loop
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._peer: str | None = None
        self._read_at = 0.0  # when the read callback that is parsing began
        # The request being parsed.
        self._url = b""
        self._forwarded: bytes | None = None
        self._facts: RequestFacts | None = None  # only with the access log on (_LoggingProtocol)
        self._flags = 0  # _KEEP_ALIVE_HEADER, _EXPECT_HEADER, _ANSWERED_EARLY, _IN_BODY
        # The request's Host (an HTTP/1.1 request needs exactly one, RFC 9112
        # 3.2), and the last good value this connection sent: a client sends
        # the same one every time, so the usual check is one comparison.
        self._host: bytes | None = None
        self._known_host = b"\0"  # never a Host value: the first is checked
        self._header_bytes = 0
        self._refusal = 0  # the status of a refusal decided inside a parser callback
        # Input bytes fed before the slice in which the request in progress
        # began; -1 while no request is in progress.
        self._began_at = -1
        self._fed = 0
        self._fed_before = 0
        # Answering, in order.
        self._queue: deque[_Request | int] = deque()  # an int: the final error answer
        self._waiting = False  # the request at the head of the line awaits a check
        self._input_closed = False  # no more requests are read (close decided, error, upgrade)
        self._eof = False  # the client shut its sending side: answer what came, then close
        self._backlog = b""  # input held back while the queue is full
        self._answered = 0  # answers given this turn
        self._turn_scheduled = False
        self._reading_paused = False
        self._writing_paused = False
        self._out: list[bytes] = []
        self._close_after_flush = False
        # Close by lingering, not at once: the client may still be sending (it
        # pipelined, sent bytes after the request that closes, or the input
        # ended in an error). As nginx's lingering_close "on" decides.
        self._linger_close = False
        self._linger: Lingering | None = None

    # -- connection lifecycle ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self._peer = peer[0] if isinstance(peer, tuple) else None
        if not self._tracker.admit(self):
            # Every open connection holds an accepted request: none may go.
            transport.close()
            self._transport = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._tracker.remove(self)
        self._transport = None
        self._queue.clear()
        self._backlog = b""

    def eof_received(self) -> bool | None:
        """The client shut its sending side (a half-close): answer what it sent, then close."""
        if self._linger is not None:
            self._linger.close()  # it has read its answers and closes: so do we
            return None
        self._eof = True
        if self._transport is not None and (self._queue or self._waiting or self._backlog):
            return True  # answers are owed: keep our sending side open for them
        return None  # nothing owed: the transport closes

    def close_now(self, reason: str) -> None:
        """Close at once, after what is already rendered (the tracker's call)."""
        linger, self._linger = self._linger, None
        if linger is not None:
            linger.transport.close()
        transport = self._transport
        if transport is not None:
            log.debug("closing connection from %s: %s", self._peer, reason)
            self._input_closed = True
            out = self._out
            if out:
                transport.write(b"".join(out))
                out.clear()
            transport.close()
            self._transport = None
        self._tracker.remove(self)

    def finish(self) -> None:
        """Close gracefully once what is rendered is sent (the tracker's call at shutdown)."""
        self._input_closed = True
        self._close_after_flush = self._linger_close = True
        self._flush()

    def pause_writing(self) -> None:
        # The client is not reading its answers: stop reading its requests.
        self._writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._update_reading()

    # -- input ----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._input_closed:
            # After a close, an error or an upgrade nothing more is read; while
            # lingering, the bytes are counted against its bound.
            if self._linger is not None:
                self._linger.received(len(data))
            else:
                self._linger_close = True  # it sends on after its last request
            return
        if self._backlog:
            self._backlog += data
            return
        self._read_at = started = _clock()
        self._answered = 0
        if len(data) > SLICE:
            self._feed(data)
        else:
            self._feed_slice(data)
            if self._queue:
                self._update_reading()
        out = self._out
        if out:
            transport = self._transport
            if transport is not None:
                transport.write(out[0] if len(out) == 1 else b"".join(out))
                # The flow's last answer was given in this callback (or was
                # counted already: then this is the discard list).
                self._flow.last_answer.append(_clock() - started)
            out.clear()
            if self._close_after_flush:
                self._flush()

    def _feed(self, data: bytes) -> None:
        """Feed input slice by slice; hold back the rest once the queue is full."""
        pos, size = 0, len(data)
        while pos < size and not self._input_closed:
            if len(self._queue) >= MAX_QUEUED:
                self._backlog = data[pos:]
                break
            self._feed_slice(data[pos : pos + SLICE])
            pos += SLICE
        self._update_reading()

    def _feed_slice(self, chunk: bytes) -> None:
        self._fed_before = self._fed
        self._fed += len(chunk)
        try:
            self._parser.feed_data(chunk)
        except httptools.HttpParserUpgrade:
            pass  # the upgrade request was answered with Connection: close
        except httptools.HttpParserError:
            if not self._input_closed:  # bytes after `Connection: close` are ignored
                self._refuse(self._refusal or 400)
            return
        if self._began_at >= 0:
            self._in_progress()

    def _in_progress(self) -> None:
        """A read ended inside a request (head or body): its deadline runs; it may not grow without bound."""
        if self._fed - self._began_at > self._engine.max_request_bytes:
            self._refuse(413 if self._flags & _IN_BODY else 431)
        elif self.state == IDLE:
            self._tracker.reading(self)

    def _refuse(self, status: int) -> None:
        """End the input with an error answer, sent after every answer owed before it."""
        self._input_closed = self._linger_close = True
        self._began_at = -1
        self._backlog = b""
        self._tracker.accepted(self)
        if self._answered and not self._waiting:
            self._file_given()  # an answer this turn gave: counted before the refusal takes the flow's last
        self._queue.append(status)
        self._drain()
        self._update_reading()

    # -- parser callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._input_closed:
            self._linger_close = True  # bytes after the request that closes: it may send more
            raise _StopParsing  # the rest of a read after a request answered early
        self._url = b""
        self._forwarded = None
        self._flags = 0
        self._host = None
        self._header_bytes = 0
        self._began_at = self._fed_before

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._engine.max_request_line:
            self._refusal = 414
            raise _StopParsing

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name)
        self._header_bytes += size + len(value) + 4
        if self._header_bytes > self._engine.max_header_bytes:
            self._refusal = 431
            raise _StopParsing
        # Names are compared as clients write them first (no lower-cased copy),
        # in any case second. A trailer field (after the head: `_IN_BODY`) is
        # never merged into the head (RFC 9110 6.5.1): the fields we read ignore it.
        if size == 4:
            if name == b"Host" or name.lower() == _HOST:
                if value == self._known_host and self._host is None:
                    self._host = value
                else:
                    self._unusual_host(value)
        elif size == 15:
            if (name == b"X-Forwarded-For" or name.lower() == _XFF) and not self._flags & _IN_BODY:
                # Repeated lines form one list, in order (RFC 9110 5.3).
                self._forwarded = value if self._forwarded is None else self._forwarded + b"," + value
        elif size == 10:
            if name.lower() == _CONNECTION and b"keep-alive" in value.lower():
                self._flags |= _KEEP_ALIVE_HEADER
        elif size == 6 and name.lower() == _EXPECT:
            self._flags |= _EXPECT_HEADER

    def _unusual_host(self, value: bytes) -> None:
        """A Host line that is not the first of a head with this connection's known good value."""
        if self._flags & _IN_BODY:
            return  # a trailer field: ignored (the head had its Host, or was refused without one)
        if self._host is not None or (value not in _GOOD_HOSTS and not valid_host(value)):
            raise _StopParsing  # a second Host, or one that is not host[:port]: 400 (RFC 9112 3.2)
        self._host = self._known_host = value

    def on_headers_complete(self) -> None:
        # The body and trailers, if any, are bounded with the head and have
        # its deadline: the request is in progress until its end.
        flags = self._flags = self._flags | _IN_BODY
        if self._host is None and self._parser.get_http_version() == "1.1":
            raise _StopParsing  # HTTP/1.1 without Host: 400 (RFC 9112 3.2)
        if flags & _EXPECT_HEADER or self._parser.should_upgrade():
            # Answer now instead of 100 Continue or switching protocols, and
            # read no further: the body or the other protocol is not ours.
            self._flags = flags | _ANSWERED_EARLY
            self._began_at = -1
            self._linger_close = True  # its body or the other protocol may follow
            self._accept(CLOSE)

    def on_message_complete(self) -> None:
        self._began_at = -1
        flags = self._flags
        if flags & _ANSWERED_EARLY:
            self._flags = 0
            return
        parser = self._parser
        if not parser.should_keep_alive() or self._tracker.closing:
            self._accept(CLOSE)
        elif flags & _KEEP_ALIVE_HEADER and parser.get_http_version() == "1.0":
            self._accept(KEEP_1_0)
        else:
            self._accept(KEEP)

    def _accept(self, mode: int) -> None:
        # An accepted request answered before this call returns never shows
        # in the tracker: nothing can close the connection meanwhile. One
        # that waits (queued, or for a check) makes the connection BUSY.
        if mode == CLOSE:
            self._input_closed = True
            if self._answered or self._queue or self._waiting:
                self._linger_close = True  # a pipelining client: more may be on its way
        method = _METHODS.get(self._parser.get_method(), "OTHER")
        if self._queue or self._waiting or self._answered:
            if self._behind(method, mode):
                return
        else:  # the first answer of this turn: the usual case
            self._answered = 1
        self._answer(method, self._url, self._forwarded, mode, self._facts)

    def _behind(self, method: str, mode: int) -> bool:
        """A request behind others of this turn, or behind a queue or a check: True if it waits in line."""
        if self._queue or self._waiting or self._answered >= BUDGET:
            if self.state != BUSY:
                self._tracker.accepted(self)
            self._queue.append((method, self._url, self._forwarded, mode, self._facts, self._read_at))
            if not self._waiting:
                self._schedule_turn()
            return True
        self._file_given()  # the answer before this one, given in this turn, is no longer the flow's last
        self._answered += 1
        return False

    # -- answering ----------------------------------------------------------------------

    def _answer(
        self, method: str, url: bytes, forwarded: bytes | None, mode: int, facts: RequestFacts | None,
        started: float | None = None,
    ) -> None:
        """Answer one request; `started`: when its read began, if not in this turn's read (a queued request)."""
        target = self._targets.get(url)
        if target is None:
            target = self._engine.split_target(url)
        try:
            outcome = self._flow.respond(method, target[0], target[1], forwarded, self._peer, facts)
        except Exception:  # a bug, never the client's fault: log it, answer 503 (as aiohttp_impl)
            log.exception("request flow failed unexpectedly")
            self._flow.refused(503)
            outcome = UNAVAILABLE
        kind = type(outcome)
        if kind is Decision:
            response = self._wire.decided(outcome, mode)  # type: ignore[arg-type]
        elif kind is LocalAnswer:
            response = self._wire.answer(outcome, method == "HEAD", mode)  # type: ignore[arg-type]
        else:
            self._waiting = True
            if self.state != BUSY:
                self._tracker.accepted(self)
            self._tracker.awaiting_check += 1
            self._tracker.track(self._loop.create_task(self._answer_later(
                outcome, method == "HEAD", mode, self._read_at if started is None else started,  # type: ignore[arg-type]
            )))
            return
        self._out.append(response)
        if mode == CLOSE:
            self._close_after_flush = True
            self._queue.clear()
        elif not self._queue and not self._waiting:
            tracker = self._tracker
            if self.state == IDLE and not tracker.closing:
                # Idle before and after: the longest idle go first, so it
                # goes to the back of the line, stamped with the coarse clock.
                tracker.idle_to_back(self)
                self.last_active = self._engine.now
            else:
                tracker.answered(self, self._began_at >= 0)

    def _respond(self, response: bytes, mode: int) -> None:
        self._out.append(response)
        if mode == CLOSE:
            self._close_after_flush = True
            self._queue.clear()
        elif not self._queue and not self._waiting:
            self._tracker.answered(self, self._began_at >= 0)

    async def _answer_later(self, pending: PendingCheck, head: bool, mode: int, started: float) -> None:
        flow = self._flow
        decision: Decision | None = None
        try:
            decision = await flow.respond_after_check(pending)
        except Exception:  # a bug, never the client's fault: log it, answer 503
            log.exception("existence check failed unexpectedly")
        finally:
            self._tracker.awaiting_check -= 1
            self._waiting = False
        if self._transport is None:
            return  # the client has gone: nothing handed over, nothing counted
        if decision is None:
            flow.refused(503)
            response = self._wire.answer(UNAVAILABLE, head, mode)
        else:
            flow.delivered(pending, decision)
            response = self._wire.decided(decision, mode)
            self._write_sampled(len(response), started)
        self._file(started)
        self._answered = 0
        self._respond(response, mode)
        self._pump()

    # -- latency and access lines of answers not given the usual way ---------------------

    def _file(self, started: float) -> None:
        """Count the flow's last answer, rendered now and written in this callback; it is taken from the flow."""
        flow = self._flow
        flow.last_answer.append(_clock() - started)
        flow.last_answer = flow.latency.discard

    def _file_given(self) -> None:
        """Count the answer this turn gave before, if it is still the flow's last (not counted yet)."""
        if self._flow.last_answer is not self._flow.latency.discard:
            self._file(self._read_at)

    def _write_sampled(self, size: int, started: float) -> None:
        """Write the access line the flow sampled for the answer just rendered, if it did."""
        flow = self._flow
        line = flow.sampled
        if line is not None:
            flow.sampled = None
            line.emit(size, _clock() - started)

    def _schedule_turn(self) -> None:
        if not self._turn_scheduled:
            self._turn_scheduled = True
            self._loop.call_soon(self._next_turn)

    def _next_turn(self) -> None:
        self._turn_scheduled = False
        if self._transport is not None:
            self._answered = 0
            self._pump()

    def _pump(self) -> None:
        """Answer what may be answered this turn, then read held-back input if there is room."""
        self._drain()
        if self._backlog and not self._waiting and len(self._queue) < MAX_QUEUED and self._answered < BUDGET:
            data, self._backlog = self._backlog, b""
            answered = self._answered
            self._feed(data)  # its requests began with the read that held them back (`_read_at`)
            if self._answered > answered and not self._waiting:
                self._file_given()  # the last answer the held input got, given just now
        self._flush()
        if self._eof and not (self._queue or self._waiting or self._backlog):
            self._close_after_flush = True  # half-closed and all answered: the end
            self._flush()
        self._update_reading()

    def _drain(self) -> None:
        queue = self._queue
        while queue and not self._waiting and self._transport is not None:
            if self._answered >= BUDGET:
                self._schedule_turn()
                return
            item = queue.popleft()
            self._answered += 1
            if type(item) is int:
                self._flow.refused(item)
                self._file(self._read_at)  # decided in the last read: nothing is read after a refusal
                self._respond(self._wire.answer(ERRORS[item], False, CLOSE), CLOSE)
                return
            self._answer(*item)  # type: ignore[misc]
            if not self._waiting:
                self._file(item[5])  # type: ignore[index]

    def _flush(self) -> None:
        out = self._out
        transport = self._transport
        if out and transport is not None:
            transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()
        if self._close_after_flush and transport is not None:
            self._close_after_flush = False
            self._transport = None
            if self._linger_close and not self._eof:
                self._linger = Lingering(self, self._tracker, transport)
            else:  # nothing more is coming: it shut its side, or sent one last request and waits
                self._tracker.remove(self)
                transport.close()

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None or self._eof:
            return
        want = not (
            self._input_closed or self._writing_paused or self._backlog or len(self._queue) >= MAX_QUEUED
        )
        if want and self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        elif not want and not self._reading_paused:
            self._reading_paused = True
            transport.pause_reading()


class _LoggingProtocol(HttpToolsProtocol):
    """The protocol while the access log is on: it samples requests for it and keeps what their lines read.

    A share ARCHEIO_ACCESS_LOG of requests is sampled when their head is
    complete; for those the flow gets `RequestFacts`: User-Agent and
    X-Cloud-Trace-Context (the first line of each, never a trailer) and the
    HTTP version. The line the flow makes of it is written once its answer
    is rendered.
    """

    __slots__ = ("_agent", "_trace", "_share")

    def __init__(self, engine: HttpToolsEngine) -> None:
        super().__init__(engine)
        self._agent: bytes | None = None
        self._trace: bytes | None = None
        self._share = engine.access_share

    def on_header(self, name: bytes, value: bytes) -> None:
        HttpToolsProtocol.on_header(self, name, value)
        if self._flags & _IN_BODY:
            return
        size = len(name)
        if size == 10:
            if self._agent is None and name.lower() == _USER_AGENT:
                self._agent = value
        elif size == 21 and self._trace is None and name.lower() == _TRACE:
            self._trace = value

    def on_headers_complete(self) -> None:
        if _random() < self._share:
            self._facts = RequestFacts(self._trace, self._agent, "HTTP/" + self._parser.get_http_version())
        else:
            self._facts = None
        self._agent = self._trace = None
        HttpToolsProtocol.on_headers_complete(self)

    def _answer(
        self, method: str, url: bytes, forwarded: bytes | None, mode: int, facts: RequestFacts | None,
        started: float | None = None,
    ) -> None:
        HttpToolsProtocol._answer(self, method, url, forwarded, mode, facts, started)
        if self._flow.sampled is not None:  # answered now (a checked answer's line is written after its check)
            self._write_sampled(len(self._out[-1]), self._read_at if started is None else started)


class HttpToolsEngine:
    """The public port served by `HttpToolsProtocol`."""

    name = "httptools"

    def __init__(self, flow: RequestFlow, settings: Settings, loop: asyncio.AbstractEventLoop) -> None:
        self.flow = flow
        self.loop = loop
        self.tracker = ConnectionTracker.from_settings(loop, settings)
        self.wire = Wire()
        # Raw request target -> (path, query): popular targets repeat.
        self.targets: dict[bytes, tuple[str, str]] = {}
        # A clock for stamping connections on the hot path, refreshed every second.
        self.now = loop.time()
        self.max_request_line = settings.max_request_line
        self.max_header_bytes = settings.max_header_bytes
        # A request in progress (head, body and trailers together) may take
        # the head's limits plus the slice it began in.
        self.max_request_bytes = settings.max_request_line + settings.max_header_bytes + SLICE
        # The access log's protocol only while it is on (chosen once, here).
        self.access_share = settings.access_log
        self.protocol: type[HttpToolsProtocol] = _LoggingProtocol if settings.access_log > 0 else HttpToolsProtocol
        self._server: asyncio.AbstractServer | None = None

    def split_target(self, url: bytes) -> tuple[str, str]:
        """The raw target as (path, query) text, remembered for the next request with it.

        The same strings each time also spare the router hashing the path
        again: a string keeps its hash.
        """
        path, _, query = url.decode("latin-1").partition("?")
        if len(url) <= _TARGET_REMEMBERED_LENGTH:
            if len(self.targets) >= _TARGETS_REMEMBERED:
                self.targets.clear()
            self.targets[url] = (path, query)
        return path, query

    async def start(self, sock: Any) -> None:
        protocol = self.protocol
        self._server = await self.loop.create_server(lambda: protocol(self), sock=sock)

    def tick(self) -> None:
        self.now = self.loop.time()
        self.wire.tick()
        self.tracker.sweep()

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def shutdown(self, grace: float) -> None:
        """Idle connections close now; the others get `grace` seconds for their answers."""
        await self.tracker.shutdown(grace)
