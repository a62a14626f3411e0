"""The public port's HTTP/1.1 connection: parsing, ordering, limits, timeouts.

Why not aiohttp's web server here: every public answer is a tiny response
to a GET or HEAD without a body, and aiohttp's per-request machinery
(Request and Response objects, a task per request, middleware dispatch)
costs several times the routing itself. This protocol parses with
httptools (the parser uvicorn uses), answers synchronously whenever it can,
and only starts a task when a blob needs an existence check. aiohttp still
serves the admin port and makes the HEAD requests. The numbers behind this
choice are in the README ("Performance").

Guarantees kept here:
- responses leave in request order, even with pipelining and async checks;
- a request line longer than `max_request_line` gets 414, headers larger
  than `max_header_bytes` 431, anything unparseable 400, then the
  connection closes: nothing is buffered without limit;
- a request whose headers (and body, if it sends one) take longer than
  `header_timeout` to arrive, and a connection idle longer than
  `keepalive_timeout`, are closed by a sweep (no timer per request);
- a client that does not read its responses stops being read from.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING

import httptools

from .routing import LocalAnswer, oci_error

if TYPE_CHECKING:
    from .app import Frontend

log = logging.getLogger("archeio.protocol")

_METHODS = {b"GET": "GET", b"HEAD": "HEAD"}
_XFF = b"x-forwarded-for"
_TRACE = b"x-cloud-trace-context"

_BAD_REQUEST = 400
_URI_TOO_LONG = 414
_HEADERS_TOO_LARGE = 431

# Pipelined requests waiting behind an existence check, at most.
_MAX_QUEUED = 64
# Allowance over the request line and header limits for the bytes of one
# read that belong to earlier pipelined requests (see data_received).
_HEAD_SLACK = 65536


class _TooLarge(Exception):
    """Raised inside a parser callback to stop parsing an oversized request."""


class Connections:
    """The open connections of one server, for the sweep and for shutdown."""

    def __init__(self, frontend: Frontend, loop: asyncio.AbstractEventLoop) -> None:
        self.frontend = frontend
        self.loop = loop
        self.open: set[RegistryProtocol] = set()
        self.closing = False
        settings = frontend.settings
        self.header_timeout = settings.header_timeout
        self.keepalive_timeout = settings.keepalive_timeout
        self.max_connections = settings.max_connections
        self.max_request_line = settings.max_request_line
        self.max_header_bytes = settings.max_header_bytes
        self.max_head_bytes = settings.max_request_line + settings.max_header_bytes + _HEAD_SLACK

    def protocol(self) -> RegistryProtocol:
        return RegistryProtocol(self)

    def sweep(self) -> None:
        """Close connections past their header deadline or idle too long."""
        now = self.loop.time()
        idle_limit = now - self.keepalive_timeout
        for conn in list(self.open):
            if conn.header_deadline and now > conn.header_deadline:
                conn.close(reason="header timeout")
            elif conn.is_idle() and conn.last_active < idle_limit:
                conn.close(reason="idle")

    def make_room(self) -> None:
        """Over the connection limit: close the longest-idle connection."""
        idle = [c for c in self.open if c.is_idle()]
        if idle:
            min(idle, key=lambda c: c.last_active).close(reason="connection limit")

    def close_idle(self) -> None:
        """At shutdown: idle connections go now, busy ones after their answer."""
        self.closing = True
        for conn in list(self.open):
            if conn.is_idle():
                conn.close(reason="shutdown")

    def busy(self) -> int:
        return sum(1 for c in self.open if not c.is_idle())


class RegistryProtocol(asyncio.Protocol):
    """One client connection of the public port."""

    def __init__(self, connections: Connections) -> None:
        self._connections = connections
        self._frontend = connections.frontend
        self._loop = connections.loop
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._peer: str | None = None
        self._url = b""
        self._forwarded: bytes | None = None
        self._trace: bytes | None = None  # X-Cloud-Trace-Context, for access logs
        self._header_bytes = 0
        self._head_bytes = 0
        self._reading_head = False
        self._too_large = 0
        self._queue: deque[tuple[str, bytes, bytes | None, bool, bytes | None]] = deque()
        self._waiting = False  # an existence check is running for this connection
        self._paused_writing = False
        self._in_request = False
        self.header_deadline = 0.0
        self.last_active = 0.0

    # -- connection lifecycle --------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self._peer = peer[0] if isinstance(peer, tuple) else None
        connections = self._connections
        self.last_active = now = self._loop.time()
        # A new connection must send its first request's headers in time.
        self.header_deadline = now + connections.header_timeout
        if len(connections.open) >= connections.max_connections:
            connections.make_room()
        connections.open.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.open.discard(self)
        self._transport = None
        self._queue.clear()

    def is_idle(self) -> bool:
        return not self._in_request and not self._waiting and not self._queue

    def close(self, reason: str) -> None:
        if self._transport is not None:
            log.debug("closing connection from %s: %s", self._peer, reason)
            self._transport.close()
            self._transport = None
        self._connections.open.discard(self)

    def pause_writing(self) -> None:
        # The client is not reading its answers: stop reading its requests.
        self._paused_writing = True
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused_writing = False
        if self._transport is not None and not self._waiting:
            self._transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # An Upgrade request (h2c, websocket) was answered as plain
            # HTTP/1.1; what follows it is not HTTP/1.1, so stop here.
            self._finish_then_close()
        except httptools.HttpParserError:
            status = self._too_large or _BAD_REQUEST
            self._send_error(status)
        else:
            if self._reading_head:
                # httptools hands a header to on_header only once it is
                # complete, buffering it until then: an endless header would
                # never reach that limit. Count the unfinished head here.
                self._head_bytes += len(data)
                if self._head_bytes > self._connections.max_head_bytes:
                    self._send_error(_HEADERS_TOO_LARGE)

    # -- parser callbacks -------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_request = True
        self._url = b""
        self._forwarded = None
        self._trace = None
        self._header_bytes = 0
        self._head_bytes = 0
        self._reading_head = True
        if not self.header_deadline:
            self.header_deadline = self._loop.time() + self._connections.header_timeout

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._connections.max_request_line:
            self._too_large = _URI_TOO_LONG
            raise _TooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self._connections.max_header_bytes:
            self._too_large = _HEADERS_TOO_LARGE
            raise _TooLarge
        if len(name) == 15 and name.lower() == _XFF:
            # Repeated headers form one comma-separated list (RFC 9110 5.3).
            self._forwarded = value if self._forwarded is None else self._forwarded + b"," + value
        elif len(name) == 21 and name.lower() == _TRACE:
            self._trace = value

    def on_headers_complete(self) -> None:
        self._reading_head = False

    def on_message_complete(self) -> None:
        # Only now: a body (which nothing here reads) must arrive within the
        # same deadline, or a slow one would hold the connection forever.
        self.header_deadline = 0.0
        self._in_request = False
        method = _METHODS.get(self._parser.get_method(), "OTHER")
        keep_alive = self._parser.should_keep_alive() and not self._connections.closing
        request = (method, self._url, self._forwarded, keep_alive, self._trace)
        if self._waiting or self._queue:
            if len(self._queue) >= _MAX_QUEUED:
                self._send_error(_BAD_REQUEST)
                return
            self._queue.append(request)
            return
        self._dispatch(request)

    # -- answering ----------------------------------------------------------

    def _dispatch(self, request: tuple[str, bytes, bytes | None, bool, bytes | None]) -> None:
        method, url, forwarded, keep_alive, trace = request
        target = url.decode("latin-1")
        path, _, query = target.partition("?")
        frontend = self._frontend
        result = frontend.respond(
            method, path, query, forwarded.decode("latin-1") if forwarded else None,
            self._peer, keep_alive, trace,
        )
        if isinstance(result, bytes):
            self._write(result, keep_alive)
            return
        route, placement, mirror = result
        self._waiting = True
        if self._transport is not None:
            self._transport.pause_reading()
        self._loop.create_task(self._answer_later(
            frontend.respond_after_check(
                method, path, query, route, placement, mirror, keep_alive,
                (forwarded.decode("latin-1") if forwarded else None, self._peer, trace),
            ),
            keep_alive,
        ))

    async def _answer_later(self, pending: object, keep_alive: bool) -> None:
        try:
            response = await pending  # type: ignore[misc]
        except Exception:  # a bug, never the client's fault: log it, answer 503
            log.exception("existence check failed unexpectedly")
            response = self._frontend.answer(_UNAVAILABLE, False, False)
            keep_alive = False
        self._waiting = False
        self._write(response, keep_alive)
        # Answer what was pipelined behind this request, in order.
        while self._queue and not self._waiting and self._transport is not None:
            self._dispatch(self._queue.popleft())
        if self._transport is not None and not self._waiting and not self._paused_writing:
            self._transport.resume_reading()

    def _write(self, response: bytes, keep_alive: bool) -> None:
        transport = self._transport
        if transport is None:
            return
        transport.write(response)
        self.last_active = self._loop.time()
        if not keep_alive:
            self.close(reason="not keep-alive")
        elif self._connections.closing and self.is_idle():
            self.close(reason="shutdown")

    def _send_error(self, status: int) -> None:
        answer = _ERRORS[status]
        if self._transport is not None and not self._waiting:
            self._transport.write(self._frontend.answer(answer, False, False))
        self.close(reason=f"parse error {status}")

    def _finish_then_close(self) -> None:
        if not self._waiting and not self._queue:
            self.close(reason="upgrade")
        else:
            self._queue.clear()


_ERRORS: dict[int, LocalAnswer] = {
    _BAD_REQUEST: oci_error(400, "UNSUPPORTED", "malformed HTTP request"),
    _URI_TOO_LONG: oci_error(414, "UNSUPPORTED", "request target too long"),
    _HEADERS_TOO_LARGE: oci_error(431, "UNSUPPORTED", "request headers too large"),
}
_UNAVAILABLE = oci_error(503, "UNAVAILABLE", "internal error, try again")
