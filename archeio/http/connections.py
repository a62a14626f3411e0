"""The open connections of one public port: states, the connection limit, deadlines.

Both HTTP engines report each connection's state here, so the limit and
the deadlines hold the same way whichever engine speaks the wire:

- IDLE: nothing received of a next request, nothing owed to the client
  (an engine may leave a connection IDLE while it answers a request within
  one callback: nothing can close it meanwhile);
- READING: part of a request has arrived, or a new connection has not yet
  sent its first request: the header deadline runs;
- BUSY: the connection holds a request we accepted and have not answered
  yet (queued behind others, or waiting for an existence check).

At the limit, `admit` makes room in O(1): it closes the connection idle the
longest, or else the connection that has been reading a request the longest
if it is past half its header deadline; if neither exists, every connection
holds an accepted request and the newcomer is refused instead, because an
accepted answer is never dropped. Two ordered dictionaries keep those
candidates in order (an `OrderedDict` is a linked list underneath: removal
anywhere and popping the oldest are both O(1); a plain dict would leave its
deleted entries at the front for `next(iter())` to skip).

The sweep, once a second, closes connections past their header deadline or
idle longer than the keep-alive timeout, looking only at the oldest of each
kind.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, OrderedDict
from collections.abc import Sized
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..config import Settings

log = logging.getLogger("archeio.http")

IDLE = 0
READING = 1
BUSY = 2


class Connection(Protocol):
    """What the tracker needs of a connection, whichever engine runs it."""

    state: int
    # When it last became idle or was last answered (loop time; an engine may
    # stamp it with a clock that is up to a second old).
    last_active: float

    def close_now(self, reason: str) -> None:
        """Close the transport at once; the engine calls `ConnectionTracker.remove`."""


class ConnectionTracker:
    """The connections of one public port, by state."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, *, max_connections: int, header_timeout: float,
        keepalive_timeout: float,
    ) -> None:
        self.loop = loop
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.keepalive_timeout = keepalive_timeout
        self.open: set[Connection] = set()
        # Idle connections, the longest idle first (each one's `last_active`
        # says since when); an engine moves one to the end as it answers it.
        self._idle: OrderedDict[Connection, None] = OrderedDict()
        # Connections reading a request -> since when (loop time), oldest first.
        self._reading: OrderedDict[Connection, float] = OrderedDict()
        # Requests waiting for an existence check (both engines count them).
        self.awaiting_check = 0
        # reason -> connections closed by the tracker (limit, deadlines, shutdown).
        self.closed: Counter[str] = Counter()
        self.closing = False

    @classmethod
    def from_settings(cls, loop: asyncio.AbstractEventLoop, settings: Settings) -> ConnectionTracker:
        return cls(
            loop, max_connections=settings.max_connections, header_timeout=settings.header_timeout,
            keepalive_timeout=settings.keepalive_timeout,
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

    def reading(self, conn: Connection) -> None:
        """An idle connection started sending a request."""
        if conn.state == IDLE:
            del self._idle[conn]
            conn.state = READING
            self._reading[conn] = self.loop.time()

    def accepted(self, conn: Connection) -> None:
        """The connection holds a request we will answer."""
        state = conn.state
        if state == READING:
            del self._reading[conn]
        elif state == IDLE:
            del self._idle[conn]
        conn.state = BUSY

    def answered(self, conn: Connection, more: bool = False) -> None:
        """Everything accepted is answered; `more`: part of a next request is here."""
        if conn not in self.open:
            return  # closed meanwhile (an engine may report a late answer)
        state = conn.state
        if state == BUSY:
            pass
        elif state == READING:
            del self._reading[conn]
        else:
            del self._idle[conn]
        if self.closing and not more:
            conn.state = IDLE
            self._close(conn, "shutdown")
        elif more:
            conn.state = READING
            self._reading[conn] = self.loop.time()
        else:
            conn.state = IDLE
            conn.last_active = self.loop.time()
            self._idle[conn] = None

    def remove(self, conn: Connection) -> None:
        """The connection is closed (idempotent)."""
        if conn in self.open:
            self.open.discard(conn)
            self._idle.pop(conn, None)
            self._reading.pop(conn, None)

    # -- making room, deadlines, shutdown -----------------------------------------

    def _make_room(self) -> bool:
        """Close one connection that holds no accepted request; False if none may go."""
        if self._idle:
            conn = next(iter(self._idle))
            self.closed["limit_idle"] += 1
            self._close(conn, "connection limit: longest idle")
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
        """Close what is past its header deadline or idle too long (oldest first)."""
        now = self.loop.time()
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
        """At shutdown: idle connections go now, the others after their answer."""
        self.closing = True
        while self._idle:
            self._close(next(iter(self._idle)), "shutdown")

    async def drain(self, grace: float, checks: Sized) -> float:
        """At shutdown: close what is idle, then wait up to `grace` seconds until no
        connection is open and no existence check (`checks`) is running; the deadline."""
        self.close_idle()
        deadline = self.loop.time() + grace
        while (self.open or checks) and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        return deadline

    def close_all(self, reason: str) -> None:
        for conn in list(self.open):
            self._close(conn, reason)

    # -- metrics ------------------------------------------------------------------

    def gauges(self) -> dict[str, int]:
        idle, reading = len(self._idle), len(self._reading)
        return {
            "open": len(self.open),
            "idle": idle,
            "reading": reading,
            "busy": len(self.open) - idle - reading,
            "awaiting_check": self.awaiting_check,
        }
