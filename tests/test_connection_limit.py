"""ARCHEIO_MAX_CONNECTIONS holds for every connection, and never costs an accepted answer.

At the limit a newcomer makes room by closing the connection idle the
longest, or else one that is mid-request and past half its header
deadline; when every connection holds an accepted request, the newcomer
itself is closed at once. Regression (issue 10): connections stuck
mid-request did not count, so 1,000 half-sent requests stayed open under a
limit of 100. The tracker's own order is tested without sockets at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from archeio.http.connections import BUSY, IDLE, READING, ConnectionTracker

from .reliability_support import (
    AWS_EU_WEST_3,
    GATE,
    AsyncClient,
    blob_path,
    closed_by_server,
    digest,
    fetch,
    port_of,
    request_bytes,
    server_with_mirror,
    wait_until,
    xff,
)

HALF_SENT = b"GET /v2/pause/manifests/latest HTTP/1.1\r\nHost: x\r\nX-Slow: "


@pytest.mark.usefixtures("engine")
async def test_limit_holds_for_connections_stuck_mid_request(tmp_path: Path) -> None:
    async with server_with_mirror(
        tmp_path, ARCHEIO_MAX_CONNECTIONS="20", ARCHEIO_HEADER_TIMEOUT="60"
    ) as (server, _mirror):
        assert server.engine is not None
        tracker = server.engine.tracker
        clients = [await AsyncClient.connect(port_of(server)) for _ in range(200)]
        for client in clients:
            with contextlib.suppress(ConnectionError):  # a refused newcomer may be gone already
                await client.send(HALF_SENT)
        closed = await asyncio.gather(*(closed_by_server(c, timeout=5) for c in clients))
        assert sum(closed) == 180
        assert len(tracker.open) == 20
        for client in clients:
            await client.close()


@pytest.mark.usefixtures("engine")
async def test_at_the_limit_a_request_past_half_its_header_deadline_makes_room(tmp_path: Path) -> None:
    async with server_with_mirror(
        tmp_path, ARCHEIO_MAX_CONNECTIONS="5", ARCHEIO_HEADER_TIMEOUT="2"
    ) as (server, _mirror):
        port = port_of(server)
        slow = [await AsyncClient.connect(port) for _ in range(5)]
        for client in slow:
            await client.send(HALF_SENT)
        assert server.engine is not None
        tracker = server.engine.tracker
        await wait_until(lambda: len(tracker.open) == 5, "five connections")
        # Younger than half the deadline: none of them may go, the newcomer does.
        assert await closed_by_server(await AsyncClient.connect(port), timeout=5)
        await asyncio.sleep(1.1)  # past half of the 2 s header deadline, before all of it
        response = await fetch(port, "/v2/pause/manifests/latest")
        assert response.status == 307
        assert await closed_by_server(slow[0], timeout=5)  # the oldest made room
        for client in slow:
            await client.close()


@pytest.mark.usefixtures("engine")
async def test_at_the_limit_with_every_connection_holding_a_request_the_newcomer_is_refused(
    tmp_path: Path,
) -> None:
    async with server_with_mirror(tmp_path, ARCHEIO_MAX_CONNECTIONS="5") as (server, mirror):
        port = port_of(server)
        mirror.mode = GATE
        mirror.present.update(digest(n) for n in range(5))
        busy = [await AsyncClient.connect(port) for _ in range(5)]
        for n, client in enumerate(busy):
            await client.send(request_bytes("GET", blob_path(digest(n)), xff(AWS_EU_WEST_3), close=False))
        await wait_until(lambda: mirror.total_heads == 5, "five HEADs held at the mirror")
        newcomer = await AsyncClient.connect(port)
        assert await closed_by_server(newcomer, timeout=5)
        mirror.release()
        for n, client in enumerate(busy):
            response = await client.read_response()
            assert response.header("Location") == f"{mirror.url}/containers/images/{digest(n)}"
            await client.close()
        await newcomer.close()


# -- the tracker's order, without sockets ------------------------------------------------


class _Conn:
    def __init__(self, name: str) -> None:
        self.name = name
        self.state = IDLE
        self.last_active = 0.0
        self.closed_for = ""

    def close_now(self, reason: str) -> None:
        self.closed_for = reason


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def time(self) -> float:
        return self.now


def _tracker(limit: int) -> tuple[ConnectionTracker, _Clock]:
    clock = _Clock()
    tracker = ConnectionTracker(
        clock, max_connections=limit, header_timeout=2.0, keepalive_timeout=600.0  # type: ignore[arg-type]
    )
    return tracker, clock


def test_tracker_closes_the_longest_idle_connection_first() -> None:
    tracker, clock = _tracker(3)
    a, b, c = _Conn("a"), _Conn("b"), _Conn("c")
    for conn in (a, b, c):
        tracker.admit(conn)
        tracker.accepted(conn)
    for conn in (b, a, c):  # b has been idle the longest
        clock.now += 1
        tracker.answered(conn)
    newcomer = _Conn("new")
    assert tracker.admit(newcomer)
    assert b.closed_for and not a.closed_for and not c.closed_for
    assert newcomer.state == READING and b not in tracker.open


def test_tracker_keeps_connections_that_hold_requests_and_refuses_the_newcomer() -> None:
    tracker, clock = _tracker(2)
    a, b = _Conn("a"), _Conn("b")
    for conn in (a, b):
        tracker.admit(conn)
        tracker.accepted(conn)
    clock.now += 100
    assert not tracker.admit(_Conn("new"))
    assert not a.closed_for and not b.closed_for and a.state == b.state == BUSY
    assert tracker.closed["limit_refused"] == 1


def test_tracker_sweeps_only_what_is_past_its_deadline() -> None:
    tracker, clock = _tracker(10)
    young, old, idle = _Conn("young"), _Conn("old"), _Conn("idle")
    tracker.admit(old)
    clock.now = 1.5
    tracker.admit(young)
    tracker.admit(idle)
    tracker.accepted(idle)
    tracker.answered(idle)
    clock.now = 2.5  # old is 2.5 s into its head, young 1.0 s
    tracker.sweep()
    assert old.closed_for == "header timeout" and not young.closed_for and not idle.closed_for
    clock.now = 602.0
    tracker.sweep()
    assert idle.closed_for == "idle"
