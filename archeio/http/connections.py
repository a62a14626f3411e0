"""The open connections of one public port: states, the limit, deadlines, closing, shutdown.

Both HTTP engines report each connection's state here, so the limit, the
deadlines and the way a connection ends hold the same whichever engine
speaks the wire:

- IDLE: nothing received of a next request, nothing owed to the client
  (an engine may leave a connection IDLE while it answers a request within
  one callback: nothing can close it meanwhile);
- READING: part of a request (its head or its body) has arrived, or a new
  connection has not yet sent its first request: the header deadline runs;
- BUSY: the connection holds a request we accepted and have not answered
  yet (queued behind others, or waiting for an existence check);
- LINGERING: we are closing it. Every answer owed was handed to the
  transport and our side is shut (`Lingering`, below); what the client
  still sends is read and thrown away for a bounded time and amount.

At the limit, `admit` makes room in O(1): it closes the connection
lingering the longest (it owes nothing: its answers are in the kernel's
hands), else the one idle the longest, else the one that has been reading a
request the longest if it is past half its header deadline; if none of
these exists, every connection holds an accepted request and the newcomer
is refused instead, because an accepted answer is never dropped. Ordered
dictionaries keep those candidates in order (an `OrderedDict` is a linked
list underneath: removal anywhere and popping the oldest are both O(1); a
plain dict would leave its deleted entries at the front for `next(iter())`
to skip).

The sweep, once a second, closes connections past their header deadline,
idle longer than the keep-alive timeout or lingering longer than theirs,
looking only at the oldest of each kind. `shutdown` is the one shutdown sequence of both engines: close what
is idle, wait up to the grace period for every connection and every task
answering one, then close the rest and cancel what still runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..config import Settings

log = logging.getLogger("archeio.http")

IDLE = 0
READING = 1
BUSY = 2
LINGERING = 3


class Connection(Protocol):
    """What the tracker needs of a connection, whichever engine runs it."""

    state: int
    # When it last became idle or was last answered (loop time; an engine may
    # stamp it with a clock that is up to a second old).
    last_active: float

    def close_now(self, reason: str) -> None:
        """Close the transport at once; the engine calls `ConnectionTracker.remove`."""

    def finish(self) -> None:
        """Everything owed is handed over: close gracefully (shut our side, then linger)."""


class ConnectionTracker:
    """The connections of one public port, by state, and the tasks answering them."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, *, max_connections: int, header_timeout: float,
        keepalive_timeout: float, linger_timeout: float = 2.0, linger_bytes: int = 65536,
    ) -> None:
        self.loop = loop
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.keepalive_timeout = keepalive_timeout
        self.linger_timeout = linger_timeout
        self.linger_bytes = linger_bytes
        self.open: set[Connection] = set()
        # Idle connections, the longest idle first (each one's `last_active`
        # says since when); an engine moves one to the end as it answers it.
        self._idle: OrderedDict[Connection, None] = OrderedDict()
        # An idle connection answered within one callback goes to the back of
        # the line (its engine stamps `last_active`): the ordered dict's own
        # method, so the hot path pays no Python call for it.
        self.idle_to_back: Callable[[Connection], None] = self._idle.move_to_end
        # An engine that answers in a later callback moves a kept-alive
        # connection IDLE -> BUSY -> IDLE itself, as `accepted` and `answered`
        # would (`idle_leave(conn)`, then its state BUSY; its state IDLE and
        # `last_active` stamped, then `idle_join(conn, None)`), with the
        # ordered dict's own methods: no Python call on the hot path.
        self.idle_leave: Callable[[Connection], None] = self._idle.__delitem__
        self.idle_join: Callable[[Connection, None], None] = self._idle.__setitem__
        # Connections reading a request -> since when (loop time), oldest first.
        self._reading: OrderedDict[Connection, float] = OrderedDict()
        # Connections closing -> their `Lingering`, the longest lingering first.
        self._lingering: OrderedDict[Connection, Lingering] = OrderedDict()
        # Requests waiting for an existence check (both engines count them).
        self.awaiting_check = 0
        # Tasks answering a request (existence checks): shutdown waits for them.
        self.tasks: set[asyncio.Task[Any]] = set()
        # reason -> connections closed by the tracker (limit, deadlines, shutdown).
        self.closed: Counter[str] = Counter()
        self.closing = False

    @classmethod
    def from_settings(cls, loop: asyncio.AbstractEventLoop, settings: Settings) -> ConnectionTracker:
        return cls(
            loop, max_connections=settings.max_connections, header_timeout=settings.header_timeout,
            keepalive_timeout=settings.keepalive_timeout, linger_timeout=settings.linger_timeout,
            linger_bytes=settings.linger_bytes,
        )

    # -- states -----------------------------------------------------------------

    def admit(self, conn: Connection) -> bool:
        """A new connection; False when it must be closed at once (the limit holds)."""
        if len(self.open) >= self.max_connections and not self._make_room():
            self.closed["limit_refused"] += 1
            return False
        self.open.add(conn)
        # A new connection owes its first request within the header deadline.
        conn.state = READING
        self._reading[conn] = self.loop.time()
        return True

    def _leave(self, conn: Connection) -> None:
        """Take the connection out of the ordered set of its current state."""
        state = conn.state
        if state == IDLE:
            del self._idle[conn]
        elif state == READING:
            del self._reading[conn]
        elif state == LINGERING:
            del self._lingering[conn]

    def reading(self, conn: Connection) -> None:
        """An idle connection started sending a request."""
        if conn.state == IDLE:
            del self._idle[conn]
            conn.state = READING
            self._reading[conn] = self.loop.time()

    def accepted(self, conn: Connection) -> None:
        """The connection holds a request we will answer."""
        if conn.state == BUSY or conn not in self.open:
            return
        self._leave(conn)
        conn.state = BUSY

    def answered(self, conn: Connection, more: bool = False) -> None:
        """Everything accepted is answered; `more`: part of a next request is here."""
        if conn not in self.open or conn.state == LINGERING:
            return  # closed or closing meanwhile (an engine may report a late answer)
        self._leave(conn)
        if self.closing and not more:
            conn.state = BUSY  # until `finish` makes it linger
            conn.finish()
        elif more:
            conn.state = READING
            self._reading[conn] = self.loop.time()
        else:
            conn.state = IDLE
            conn.last_active = self.loop.time()
            self._idle[conn] = None

    def lingering(self, conn: Connection, linger: Lingering) -> None:
        """The connection is closing: its answers are handed over and its side shut."""
        if conn not in self.open or conn.state == LINGERING:
            return
        self._leave(conn)
        conn.state = LINGERING
        self._lingering[conn] = linger

    def remove(self, conn: Connection) -> None:
        """The connection is closed (idempotent)."""
        if conn in self.open:
            self.open.discard(conn)
            self._idle.pop(conn, None)
            self._reading.pop(conn, None)
            self._lingering.pop(conn, None)

    def track(self, task: asyncio.Task[Any]) -> None:
        """Keep a task answering a request referenced until it ends; shutdown waits for it."""
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- making room, deadlines, shutdown -----------------------------------------

    def _make_room(self) -> bool:
        """Close one connection that holds no accepted request; False if none may go."""
        if self._lingering:
            self.closed["limit_lingering"] += 1
            self._close(next(iter(self._lingering)), "connection limit: lingering")
            return True
        if self._idle:
            self.closed["limit_idle"] += 1
            self._close(next(iter(self._idle)), "connection limit: longest idle")
            return True
        if self._reading:
            conn, started = next(iter(self._reading.items()))
            if self.loop.time() - started > self.header_timeout / 2:
                self.closed["limit_slow"] += 1
                self._close(conn, "connection limit: slow request")
                return True
        return False

    def _close(self, conn: Connection, reason: str) -> None:
        self.remove(conn)
        conn.close_now(reason)

    def sweep(self) -> None:
        """Close what is past its header deadline, idle too long, or done lingering (oldest first)."""
        now = self.loop.time()
        lingering = self._lingering
        while lingering:
            linger = next(iter(lingering.values()))
            if now - linger.since <= self.linger_timeout:
                break
            if linger.still_reading():
                linger.since = now  # another period, at the back of the line
                lingering.move_to_end(linger.conn)
                continue
            self.closed["linger_timeout"] += 1
            linger.close()
        while self._reading:
            conn, started = next(iter(self._reading.items()))
            if now - started <= self.header_timeout:
                break
            self.closed["header_timeout"] += 1
            self._close(conn, "header timeout")
        while self._idle:
            conn = next(iter(self._idle))
            if now - conn.last_active <= self.keepalive_timeout:
                break
            self.closed["keepalive_timeout"] += 1
            self._close(conn, "idle")

    def close_idle(self) -> None:
        """At shutdown: idle connections go now, the others after their answers."""
        self.closing = True
        while self._idle:
            conn = next(iter(self._idle))
            self._leave(conn)
            conn.state = BUSY
            conn.finish()

    async def shutdown(self, grace: float, before_close: Callable[[float], Awaitable[Any]] | None = None) -> None:
        """The shutdown of a public port, after it stopped accepting.

        Idle connections close now (gracefully); the others, and every task
        answering a request, get `grace` seconds. Then `before_close` (given
        the seconds left) may end what an engine keeps of its own, every
        connection still open is closed, and every task still running is
        cancelled and awaited.
        """
        self.close_idle()
        deadline = self.loop.time() + grace
        while (self.open or self.tasks) and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        if before_close is not None:
            await before_close(max(0.0, deadline - self.loop.time()))
        for conn in list(self.open):
            self._close(conn, "grace period over")
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- metrics ------------------------------------------------------------------

    def gauges(self) -> dict[str, int]:
        idle, reading, lingering = len(self._idle), len(self._reading), len(self._lingering)
        return {
            "open": len(self.open),
            "idle": idle,
            "reading": reading,
            "lingering": lingering,
            "busy": len(self.open) - idle - reading - lingering,
            "awaiting_check": self.awaiting_check,
        }


class Lingering:
    """The last stage of closing a connection ourselves (RFC 9112 9.6).

    Closing a socket that still has unread input makes the kernel answer
    with a reset, and a reset destroys whatever the client has not read yet:
    a client that pipelined requests behind a `Connection: close` (or a
    malformed one) would lose answers owed to it. So a connection closes in
    stages: no more requests are read, every answer owed is handed to the
    transport, our side is shut (`write_eof`: the FIN follows the answers),
    then what the client still sends is read and discarded until it closes
    its side, at most `linger_bytes` bytes, and for at most `linger_timeout`
    seconds after the last sign that the client is still reading our
    answers (the transport's buffer shrinking). Then the socket closes.

    No timer per connection: the tracker's once-a-second sweep ends the
    lingering connections past their time (so a lingering close lasts
    between `linger_timeout` and one second more), and a client that closes
    its side ends it at once, which is what well-behaved clients do.
    """

    __slots__ = ("conn", "tracker", "transport", "discarded", "since", "buffered")

    def __init__(self, conn: Connection, tracker: ConnectionTracker, transport: asyncio.Transport) -> None:
        self.conn = conn
        self.tracker = tracker
        self.transport = transport
        self.discarded = 0
        self.since = tracker.loop.time()
        self.buffered = transport.get_write_buffer_size()
        if transport.can_write_eof():
            transport.write_eof()
        transport.resume_reading()
        tracker.lingering(conn, self)

    def received(self, size: int) -> None:
        """The client sent `size` more bytes: thrown away, within the bound."""
        self.discarded += size
        if self.discarded > self.tracker.linger_bytes:
            self.tracker.closed["linger_bytes"] += 1
            self.close()

    def still_reading(self) -> bool:
        """Has the client read some of what it is owed since the last look?"""
        buffered = self.transport.get_write_buffer_size()
        progress = 0 < buffered < self.buffered
        self.buffered = buffered
        return progress

    def close(self) -> None:
        """The end: the client closed its side, or a bound was reached."""
        self.tracker.remove(self.conn)
        self.transport.close()
