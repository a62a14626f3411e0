"""How a connection ends, and what it may hold, on both engines (issue 17's defects).

Each test names what a client sends and what must come back; each failed
on the engines before issue 17 (main at e30717c). The rows that compare
with nginx as the reference are in test_connection_reference.py; here are
the limits at their edges, the counting of answers, the header deadline's
reach, the Host rule and the one error path.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
from pathlib import Path
from typing import Any

import pytest

from archeio.app import CLIENTS_REMEMBERED, FORWARDED_REMEMBERED_LENGTH, RequestFlow
from archeio.existence import BlobExistenceCache
from archeio.routing import BLOB, LOCAL
from iprange import load_index

from . import engines
from .conftest import make_settings
from .reliability_support import (
    AWS_EU_WEST_3,
    SLOW,
    AsyncClient,
    blob_path,
    closed_by_server,
    digest,
    port_of,
    request_bytes,
    server_with_mirror,
    wait_until,
    xff,
)

pytestmark = pytest.mark.usefixtures("engine")

_LINGER_ZERO = b"\x01\x00\x00\x00\x00\x00\x00\x00"  # struct linger {on, 0 s}: close() sends RST


def tracker_of(server: Any) -> Any:
    assert server.engine is not None
    return server.engine.tracker


def counted(server: Any, kind: str) -> int:
    return sum(n for (k, _backend, _status), n in server.flow.requests.items() if k == kind)


async def reset(client: AsyncClient) -> None:
    """Close the client's socket with a reset: the server's transport is lost at once."""
    sock = client.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    client.writer.transport.abort()
    with contextlib.suppress(OSError):
        await client.writer.wait_closed()


# -- answers are counted once handed to the transport ----------------------------------


async def test_an_answer_whose_client_has_gone_is_not_counted(tmp_path: Path) -> None:
    async with server_with_mirror(tmp_path) as (server, mirror):
        mirror.mode, mirror.delay = SLOW, 0.5
        mirror.present.add(digest(1))
        gone = await AsyncClient.connect(port_of(server))
        await gone.send(request_bytes("GET", blob_path(digest(1)), xff(AWS_EU_WEST_3), close=False))
        await wait_until(lambda: mirror.total_heads == 1, "the check to reach the mirror")
        await reset(gone)
        stays = await AsyncClient.connect(port_of(server))
        response = await stays.get(blob_path(digest(1)), xff(AWS_EU_WEST_3))  # shares the same check
        assert response.status == 307
        await wait_until(lambda: tracker_of(server).awaiting_check == 0, "both checks to end")
        assert counted(server, BLOB) == 1
        await stays.close()


# -- lingering close: its bounds at their edges ----------------------------------------


async def close_then_linger(server: Any) -> AsyncClient:
    """A pipelining client whose last request says `Connection: close`; it keeps its socket open.

    A pipelining client may have more on its way: its connection lingers.
    """
    client = await AsyncClient.connect(port_of(server))
    await client.send(request_bytes("GET", "/v2/", close=False) + request_bytes("GET", "/v2/", close=True))
    assert (await client.read_response()).status == 200
    response = await client.read_response()
    assert response.status == 200 and response.announces_close
    assert await client.reader.read() == b""  # our FIN follows the answer
    await wait_until(lambda: tracker_of(server).gauges()["lingering"] == 1, "the connection to linger")
    return client


@pytest.mark.parametrize(("sent", "ended_by"), [(1000, "linger_timeout"), (1001, "linger_bytes")])
async def test_lingering_discards_up_to_its_byte_bound(tmp_path: Path, sent: int, ended_by: str) -> None:
    async with server_with_mirror(tmp_path, ARCHEIO_LINGER_BYTES="1000", ARCHEIO_LINGER_TIMEOUT="1") as (server, _):
        client = await close_then_linger(server)
        await client.send(b"x" * sent)
        tracker = tracker_of(server)
        await wait_until(lambda: not tracker.open, "the lingering connection to end")
        assert dict(tracker.closed) == {ended_by: 1}
        await client.close()


async def test_a_lone_request_that_closes_closes_at_once(tmp_path: Path) -> None:
    # Nothing suggests the client sends more (RFC 9112 9.6: after `close` it
    # MUST NOT): no lingering, as nginx's lingering_close "on" decides.
    async with server_with_mirror(tmp_path, ARCHEIO_LINGER_TIMEOUT="300") as (server, _):
        client = await AsyncClient.connect(port_of(server))
        await client.send(request_bytes("GET", "/v2/", close=True))
        assert (await client.read_response()).announces_close
        assert await client.reader.read() == b""
        tracker = tracker_of(server)
        await wait_until(lambda: not tracker.open, "the connection to close without lingering")
        assert not tracker.closed
        await client.close()


async def test_lingering_ends_when_the_client_closes(tmp_path: Path) -> None:
    async with server_with_mirror(tmp_path, ARCHEIO_LINGER_TIMEOUT="300") as (server, _):
        client = await close_then_linger(server)
        await client.close()
        tracker = tracker_of(server)
        await wait_until(lambda: not tracker.open, "the lingering connection to end with its client's FIN")
        assert not tracker.closed  # neither bound was needed


async def test_a_lingering_connection_is_the_first_closed_for_a_newcomer(tmp_path: Path) -> None:
    async with server_with_mirror(tmp_path, ARCHEIO_MAX_CONNECTIONS="2", ARCHEIO_LINGER_TIMEOUT="300") as (server, _):
        tracker = tracker_of(server)
        idle = await AsyncClient.connect(port_of(server))
        assert (await idle.get("/v2/")).status == 200
        lingering = await close_then_linger(server)
        newcomer = await AsyncClient.connect(port_of(server))
        assert (await newcomer.get("/v2/")).status == 200
        assert tracker.closed["limit_lingering"] == 1 and "limit_idle" not in tracker.closed
        assert (await idle.get("/v2/")).status == 200  # the idle one was kept
        for client in (idle, lingering, newcomer):
            await client.close()


async def test_shutdown_does_not_wait_for_lingering_beyond_the_grace_period(tmp_path: Path) -> None:
    async with server_with_mirror(tmp_path, ARCHEIO_LINGER_TIMEOUT="300") as (server, _):
        client = await close_then_linger(server)
        server.grace = 0.2
    # The server stopped (the context's exit waits at most grace + 30 s) with the client still there.
    assert server.engine is not None and not server.engine.tracker.open
    await client.close()


# -- bodies and trailers are bounded as headers are -----------------------------------


ENDLESS_TRAILER = b"GET /v2/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: " + b"a" * 200_000


async def test_an_endless_trailer_is_never_kept(tmp_path: Path) -> None:
    # The lean engine counts the bytes after the head itself (httptools keeps
    # a trailer's value in its parser) and refuses at the bound: 413. aiohttp
    # answers the request, refuses the trailer field at its own field limit
    # and closes once its wait for the rest of the body (the header deadline) ends.
    async with server_with_mirror(tmp_path, ARCHEIO_HEADER_TIMEOUT="1") as (server, _):
        client = await AsyncClient.connect(port_of(server))
        await client.send(ENDLESS_TRAILER)
        response = await client.read_response()
        assert response.status == (200 if engines.current() == "aiohttp" else 413)
        assert await closed_by_server(client)
        other = await AsyncClient.connect(port_of(server))
        assert (await other.get("/v2/")).status == 200  # the loop was never held
        await other.close()
        await client.close()


async def test_a_request_within_the_head_limits_is_read_body_and_all(tmp_path: Path) -> None:
    # Head and body together within ARCHEIO_MAX_REQUEST_LINE + ARCHEIO_MAX_HEADER_BYTES.
    async with server_with_mirror(tmp_path) as (server, _):
        client = await AsyncClient.connect(port_of(server))
        head = b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 16384\r\n\r\n"
        await client.send(head + b"b" * 16384 + request_bytes("GET", "/v2/", close=True))
        assert (await client.read_response()).status == 200
        assert (await client.read_response()).status == 200  # read after the body
        await client.close()


async def test_an_unfinished_body_past_the_bound_is_refused(tmp_path: Path) -> None:
    # The lean engine bounds a request's head, body and trailers together by
    # ARCHEIO_MAX_REQUEST_LINE + ARCHEIO_MAX_HEADER_BYTES plus one 8 KiB
    # slice: an unfinished body past it gets 413 (named difference
    # `body-limit`: aiohttp answers at the head and then discards the body,
    # for at most the header deadline).
    async with server_with_mirror(tmp_path, ARCHEIO_HEADER_TIMEOUT="1") as (server, _):
        client = await AsyncClient.connect(port_of(server))
        head = b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"
        await client.send(head + b"b" * (8192 + 16384 + 8192 + 1))
        response = await client.read_response()
        assert response.status == (200 if engines.current() == "aiohttp" else 413)
        assert await closed_by_server(client, timeout=10)
        await client.close()


# -- the header deadline covers every request's head and body -------------------------


@pytest.mark.parametrize("second", [
    pytest.param(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n", id="body-never-sent"),
    pytest.param(b"GET /v2/ HTTP/1.1\r\nHos", id="head-cut-short"),
])
async def test_header_deadline_covers_the_second_request_on_a_connection(tmp_path: Path, second: bytes) -> None:
    async with server_with_mirror(tmp_path, ARCHEIO_HEADER_TIMEOUT="0.5") as (server, _):
        client = await AsyncClient.connect(port_of(server))
        await client.send(request_bytes("GET", "/v2/", close=False) + second)  # one send
        assert (await client.read_response()).status == 200
        # Closed within seconds, not kept as idle for the keep-alive timeout
        # (620 s); aiohttp's own wait for a body is set to the deadline too.
        assert await closed_by_server(client, timeout=10)
        assert not tracker_of(server).closed["keepalive_timeout"]
        await client.close()


# -- Host (RFC 9112 3.2) --------------------------------------------------------------

HOST_CASES = [
    # (request line, Host lines, status)
    (b"GET /v2/ HTTP/1.1", b"Host: registry.k8s.io\r\n", 200),
    (b"GET /v2/ HTTP/1.1", b"Host: registry.k8s.io:443\r\n", 200),
    (b"GET /v2/ HTTP/1.1", b"Host: 127.0.0.1:8080\r\n", 200),
    (b"GET /v2/ HTTP/1.1", b"Host: [::1]:8080\r\n", 200),
    (b"GET /v2/ HTTP/1.1", b"Host: [v1.fe80::a+en1]\r\n", 200),
    (b"GET /v2/ HTTP/1.1", b"Host: xn--bcher-kva.example\r\n", 200),
    (b"GET /v2/ HTTP/1.1", b"Host: a%41b\r\n", 200),
    (b"GET /v2/ HTTP/1.1", b"Host: \r\n", 200),  # an empty reg-name is allowed
    (b"GET /v2/ HTTP/1.0", b"", 200),  # HTTP/1.0 may omit it
    (b"GET /v2/ HTTP/1.1", b"", 400),
    (b"GET /v2/ HTTP/1.1", b"Host: a\r\nHost: a\r\n", 400),
    (b"GET /v2/ HTTP/1.1", b"Host: a\r\nHost: b\r\n", 400),
    (b"GET /v2/ HTTP/1.0", b"Host: a\r\nHost: b\r\n", 400),
    (b"GET /v2/ HTTP/1.1", b"Host: a b\r\n", 400),
    (b"GET /v2/ HTTP/1.1", b"Host: a:b\r\n", 400),
    (b"GET /v2/ HTTP/1.1", b"Host: a:1:2\r\n", 400),
    (b"GET /v2/ HTTP/1.1", b"Host: a/b\r\n", 400),
    (b"GET /v2/ HTTP/1.1", b"Host: user@a\r\n", 400),
    (b"GET /v2/ HTTP/1.1", b"Host: [::1\r\n", 400),
    (b"GET /v2/ HTTP/1.1", b"Host: [zz::1]\r\n", 400),
    (b"GET /v2/ HTTP/1.1", b"Host: ::1\r\n", 400),
    (b"GET /v2/ HTTP/1.1", b"Host: a%zz\r\n", 400),
    (b"GET /v2/ HTTP/1.1", b"Host: \xc3\xa9.example\r\n", 400),
]


@pytest.mark.parametrize(("line", "host", "status"), HOST_CASES)
async def test_host_header_rule(tmp_path: Path, line: bytes, host: bytes, status: int) -> None:
    async with server_with_mirror(tmp_path) as (server, _):
        client = await AsyncClient.connect(port_of(server))
        await client.send(line + b"\r\n" + host + b"Connection: close\r\n\r\n")
        response = await client.read_response()
        assert response.status == status
        if status == 400:
            assert response.announces_close
            assert server.flow.requests.get(("http", LOCAL, 400)) == 1  # counted as a refusal
        await client.close()


# -- one error path ---------------------------------------------------------------------


class Broken(Exception):
    """An unexpected failure injected into the server (a bug, never the client's fault)."""


def _raise(*_args: Any, **_kwargs: Any) -> Any:
    raise Broken("injected")


async def _raise_async(*_args: Any, **_kwargs: Any) -> Any:
    raise Broken("injected")


@pytest.mark.parametrize("where", ["existence check", "request flow"])
async def test_an_unexpected_exception_is_answered_503_and_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, where: str,
) -> None:
    async with server_with_mirror(tmp_path) as (server, _):
        if where == "existence check":
            monkeypatch.setattr(server.flow.cache, "check", _raise_async)
        else:
            monkeypatch.setattr(server.flow, "respond", _raise)
        client = await AsyncClient.connect(port_of(server))
        response = await client.get(blob_path(digest(7)), xff(AWS_EU_WEST_3))
        assert response.status == 503
        assert json.loads(response.body)["errors"][0]["code"] == "UNAVAILABLE"
        assert server.flow.requests.get(("http", LOCAL, 503)) == 1
        assert (await client.get("/v2/")).status in (200, 503)  # the connection goes on
        assert any("injected" in (r.exc_text or "") or r.exc_info for r in caplog.records)
        await client.close()


# -- the X-Forwarded-For memo is bounded in entries and bytes -------------------------


@pytest.mark.parametrize(("length", "remembered"), [(FORWARDED_REMEMBERED_LENGTH, True),
                                                    (FORWARDED_REMEMBERED_LENGTH + 1, False)])
def test_a_forwarded_value_is_remembered_only_up_to_its_length_bound(length: int, remembered: bool) -> None:
    flow = RequestFlow(make_settings(), load_index(None), BlobExistenceCache.from_settings(make_settings()))
    tail = f"{AWS_EU_WEST_3}, 130.211.0.1"
    value = "1.2.3.4, " * ((length - len(tail)) // 9) + tail
    value = " " * (length - len(value)) + value
    assert len(value) == length
    flow.respond("GET", blob_path(digest(1)), "", value, None)
    assert (value in flow._clients) is remembered


def test_the_forwarded_memo_holds_at_most_its_entries() -> None:
    flow = RequestFlow(make_settings(), load_index(None), BlobExistenceCache.from_settings(make_settings()))
    for n in range(CLIENTS_REMEMBERED * 3):
        flow.respond("GET", blob_path(digest(1)), "", f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}, 130.211.0.1",
                     None)
        assert len(flow._clients) <= CLIENTS_REMEMBERED


async def test_a_request_that_cannot_be_parsed_is_counted_not_logged_as_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    # aiohttp alone logs each at ERROR with a traceback: on a public port, noise.
    async with server_with_mirror(tmp_path) as (server, _):
        for garbage in (b"GET /v2/ HTTP/1.1\r\nHost: x\r\nBad header\r\n\r\n", b"\x16\x03\x01\x00\xa5\x01\r\n\r\n"):
            client = await AsyncClient.connect(port_of(server))
            await client.send(garbage)
            assert (await client.read_response()).status == 400
            await client.close()
        assert server.flow.requests.get(("http", LOCAL, 400)) == 2
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_the_host_memo_holds_at_most_its_entries_of_bounded_length() -> None:
    from archeio.http import hosts

    for n in range(hosts.REMEMBERED * 4):
        assert hosts.valid_host(b"host-%d.example:%d" % (n, n % 65536))
        assert not hosts.valid_host(b"bad host %d" % n)
        assert len(hosts.KNOWN) <= hosts.REMEMBERED and len(hosts.GOOD) <= hosts.REMEMBERED
    long = b"a" * (hosts.REMEMBERED_LENGTH + 1)
    assert hosts.valid_host(long) and long not in hosts.KNOWN
    edge = b"b" * hosts.REMEMBERED_LENGTH
    assert hosts.valid_host(edge) and edge in hosts.GOOD
