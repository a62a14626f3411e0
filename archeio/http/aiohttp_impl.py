"""The aiohttp engine: the same request flow on aiohttp's low-level `web.Server`.

The battle-tested stack the project's design names, for operators who
prefer it to our own protocol (`--http aiohttp`), and a second, independent
implementation the tests compare the lean engine with. The flow is our
router, so no `web.Application` router sits in between: one handler turns
each request into `RequestFlow.respond` arguments and the decision into a
`web.Response`; aiohttp renders the wire format (status line, Date,
keep-alive) itself.

aiohttp honours some settings on its own, and answers differently at their
edges (the settings table says which): the request target (its
`max_line_size` bounds the target, as ours does, but answers 400 rather
than 414), header size (each name and value, 400 rather than 431),
keep-alive and pipelining (it pauses reading at 32 queued requests,
aiohttp 3.14). It has no connection limit and no header deadline: each
connection is wrapped in `_TrackedConnection`, which forwards every event
to aiohttp's own connection handler and reports its state to the same
`ConnectionTracker` the lean engine uses, without patching aiohttp. The
state changes come from the transport (data arrives), our handler (a
request is accepted) and aiohttp's access-logger hook, which it calls once
per response sent, refusals included; that hook also counts the refusals.
The wrapper also hands aiohttp pipelined input one request head at a time,
so that a malformed request cannot cost the valid ones before it their
answers (see `_TrackedConnection.data_received`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from ..routing import Decision, LocalAnswer
from .connections import BUSY, IDLE, ConnectionTracker

if TYPE_CHECKING:
    from ..app import RequestFlow
    from ..config import Settings

log = logging.getLogger("archeio.http")

# Marks a request that reached our handler (aiohttp's refusals never do).
_ROUTED = web.RequestKey("archeio_routed", bool)


class _TrackedConnection(asyncio.Protocol):
    """aiohttp's connection handler, with its state reported to the tracker."""

    __slots__ = ("state", "last_active", "engine", "inner", "transport", "more", "made")

    def __init__(self, engine: AiohttpEngine) -> None:
        self.state = IDLE
        self.last_active = 0.0
        self.engine = engine
        self.inner = engine.server()
        self.transport: asyncio.BaseTransport | None = None
        self.more = False  # data arrived while a request was being handled
        self.made = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if not self.engine.tracker.admit(self):
            transport.close()
            self.transport = None
            return
        self.made = True
        self.engine.connections[self.inner] = self
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.state == IDLE:
            self.engine.tracker.reading(self)
        elif self.state == BUSY:
            self.more = True
        # aiohttp parses a whole read at once and, if any of it is malformed,
        # replaces every request parsed from that read with its one 400:
        # valid requests before the bad one would lose their answers. Handed
        # one request head at a time (as a slow network could), it queues
        # each valid request before it meets the bad one.
        end = data.find(b"\r\n\r\n") + 4
        if 3 < end < len(data):
            inner = self.inner
            start = 0
            while 3 < end < len(data):
                inner.data_received(data[start:end])
                start, end = end, data.find(b"\r\n\r\n", end) + 4
            inner.data_received(data[start:])
        else:
            self.inner.data_received(data)

    def eof_received(self) -> None:
        self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.engine.tracker.remove(self)
        self.engine.connections.pop(self.inner, None)
        self.transport = None
        if self.made:
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def close_now(self, reason: str) -> None:
        if self.transport is not None:
            log.debug("closing connection: %s", reason)
            self.transport.close()
        self.engine.tracker.remove(self)


def _access_hook(engine: AiohttpEngine) -> type[AbstractAccessLogger]:
    class ResponseSent(AbstractAccessLogger):
        """aiohttp calls this once per response it sent: our refusals and state hook."""

        def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
            engine.response_sent(request, response)

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
        self.server = web.Server(
            self._handle,
            keepalive_timeout=settings.keepalive_timeout,
            max_line_size=settings.max_request_line,
            max_field_size=settings.max_header_bytes,
            access_log_class=_access_hook(self),
            access_log=logging.getLogger("archeio.http.aiohttp"),
        )
        # aiohttp's connection handler -> our wrapper of it.
        self.connections: dict[Any, _TrackedConnection] = {}
        # Handlers waiting for an existence check: shutdown waits for them
        # even when their client has gone (aiohttp then forgets them).
        self._checks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.AbstractServer | None = None

    async def start(self, sock: Any) -> None:
        self._server = await self.loop.create_server(lambda: _TrackedConnection(self), sock=sock)

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        request[_ROUTED] = True
        conn = self.connections.get(request.protocol)
        if conn is not None:
            conn.more = False
            self.tracker.accepted(conn)
        target = request.raw_path
        if not target.isascii():
            # aiohttp decodes the target as UTF-8 with surrogate escapes; the
            # flow reads raw bytes as latin-1 characters, as the lean engine
            # hands them over.
            target = target.encode("utf-8", "surrogateescape").decode("latin-1")
        path, _, query = target.partition("?")
        headers = request.headers
        lines = headers.getall("X-Forwarded-For", None)
        forwarded = None
        if lines:
            forwarded = ",".join(lines)
            if not forwarded.isascii():  # as the target: raw bytes as latin-1 characters
                forwarded = forwarded.encode("utf-8", "surrogateescape").decode("latin-1")
        trace = headers.get("X-Cloud-Trace-Context")
        outcome = self.flow.respond(
            request.method, path, query, forwarded, request.remote,
            trace.encode("utf-8", "surrogateescape") if trace else None,
        )
        if type(outcome) is Decision:
            return _redirect(outcome.location)
        if type(outcome) is LocalAnswer:
            return _local_response(outcome)
        task = asyncio.current_task()
        assert task is not None
        self._checks.add(task)
        self.tracker.awaiting_check += 1
        try:
            decision = await self.flow.respond_after_check(outcome)  # type: ignore[arg-type]
        finally:
            self.tracker.awaiting_check -= 1
            self._checks.discard(task)
        return _redirect(decision.location)

    def response_sent(self, request: web.BaseRequest, response: web.StreamResponse) -> None:
        if request.get(_ROUTED) is None:
            self.flow.refused(response.status)
        conn = self.connections.get(request.protocol)
        if conn is not None and conn.transport is not None:
            self.tracker.answered(conn, conn.more)

    def tick(self) -> None:
        self.tracker.sweep()

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def shutdown(self, grace: float) -> None:
        """Idle connections close now; the others get `grace` seconds for their answers."""
        deadline = await self.tracker.drain(grace, self._checks)
        await self.server.shutdown(max(0.0, deadline - self.loop.time()))
        self.tracker.close_all("grace period over")
        for task in list(self._checks):
            task.cancel()
        await asyncio.gather(*self._checks, return_exceptions=True)


def _redirect(location: str) -> web.Response:
    # Content-Length said explicitly: aiohttp leaves it out of a bodiless HEAD answer.
    return web.Response(status=307, headers={"Location": location, "Content-Length": "0"})


def _local_response(answer: LocalAnswer) -> web.Response:
    headers: dict[str, str] = dict(answer.headers)
    headers["Content-Length"] = str(len(answer.body))
    if answer.location is not None:
        headers["Location"] = answer.location
    if answer.content_type is not None:
        headers["Content-Type"] = answer.content_type
    return web.Response(status=answer.status, body=answer.body, headers=headers)
