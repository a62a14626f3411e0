"""Smaller HTTP/1.1 matters of the public port, on both engines (issue 10).

Expect: 100-continue gets its final answer at once; an Upgrade request is
answered as plain HTTP/1.1 the same way whatever the cache holds; HTTP/1.0
keep-alive is said; repeated X-Forwarded-For lines form one list, whose
entry before the load balancer's is the client; every answer the port
gives is counted by status, refusals included, and the gauges tell
connections mid-request from requests waiting for a check; a check in
flight at shutdown ends before the client session closes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from archeio.server import Server
from archeio.sockets import bind

from . import engines
from .reliability_support import (
    AWS_EU_WEST_3,
    GATE,
    GOOGLE_CLOUD,
    LOAD_BALANCER,
    REGISTRY_PATH,
    UPSTREAM,
    AsyncClient,
    FakeMirror,
    blob_path,
    closed_by_server,
    digest,
    port_of,
    request_bytes,
    server_env,
    server_with_mirror,
    settings_from,
    wait_until,
    xff,
)

pytestmark = pytest.mark.usefixtures("engine")

BLOB = digest(3)


async def test_expect_100_continue_gets_the_final_answer_without_waiting_for_the_body(tmp_path: Path) -> None:
    # A header deadline far away: the answer cannot be the deadline's doing.
    async with server_with_mirror(tmp_path, ARCHEIO_HEADER_TIMEOUT="60") as (server, _mirror):
        client = await AsyncClient.connect(port_of(server))
        await client.send(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n")
        async with asyncio.timeout(10):
            response = await client.read_response()
        assert response.status == 200
        # Named difference "expect-continue": the lean engine reads no body
        # and closes; aiohttp keeps the connection and would read the body.
        assert response.announces_close == (engines.current() == "httptools")
        await client.close()


@pytest.mark.parametrize("cached", [True, False], ids=["blob-cached", "blob-needs-check"])
async def test_upgrade_request_is_answered_as_http_1_1_whatever_the_cache_holds(tmp_path: Path, cached: bool) -> None:
    async with server_with_mirror(tmp_path) as (server, mirror):
        port = port_of(server)
        mirror.present.add(BLOB)
        if cached:
            warm = await AsyncClient.connect(port)
            await warm.get(blob_path(BLOB), xff(AWS_EU_WEST_3))
            await warm.close()
        client = await AsyncClient.connect(port)
        await client.send(
            f"GET {blob_path(BLOB)} HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: {xff(AWS_EU_WEST_3)}\r\n"
            "Connection: Upgrade\r\nUpgrade: h2c\r\n\r\nGET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
        response = await client.read_response()
        assert response.header("Location") == f"{mirror.url}/containers/images/{BLOB}"
        if engines.current() == "httptools":
            # The lean engine switches to nothing and reads no further: it says so.
            assert response.header("Connection") == "close"
            assert await closed_by_server(client)
        else:
            # Named difference "upgrade": aiohttp declines and reads on.
            assert (await client.read_response()).status == 200
        await client.close()


async def test_http_1_0_keep_alive_is_said_and_kept(tmp_path: Path) -> None:
    async with server_with_mirror(tmp_path) as (server, _mirror):
        client = await AsyncClient.connect(port_of(server))
        await client.send(b"GET /v2/ HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        first = await client.read_response()
        assert first.status == 200 and first.header("Connection") == "keep-alive"
        await client.send(b"GET /v2/pause/manifests/1 HTTP/1.0\r\n\r\n")
        second = await client.read_response()
        assert second.status == 307 and second.announces_close
        await client.close()


@pytest.mark.parametrize("lines, client", [
    # The load balancer appends `<client>, <itself>` to the last line.
    pytest.param([GOOGLE_CLOUD, f"{AWS_EU_WEST_3}, {LOAD_BALANCER}"], "aws", id="forged-first-line"),
    # ... or adds a line of its own: the entries still form one list, in order.
    pytest.param([f"{GOOGLE_CLOUD}, {AWS_EU_WEST_3}", LOAD_BALANCER], "aws", id="load-balancer-own-line"),
    pytest.param([AWS_EU_WEST_3, GOOGLE_CLOUD, LOAD_BALANCER], "google", id="three-lines"),
])
async def test_repeated_forwarded_lines_form_one_list_and_the_entry_before_the_last_wins(
    tmp_path: Path, lines: list[str], client: str,
) -> None:
    async with server_with_mirror(tmp_path) as (server, mirror):
        mirror.present.add(BLOB)
        conn = await AsyncClient.connect(port_of(server))
        headers = "".join(f"X-Forwarded-For: {line}\r\n" for line in lines)
        await conn.send(f"GET {blob_path(BLOB)} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
        location = (await conn.read_response()).header("Location")
        expected = {
            "aws": f"{mirror.url}/containers/images/{BLOB}",  # eu-west-3's mirror
            "google": f"{UPSTREAM}/v2/{REGISTRY_PATH}/pause/blobs/{BLOB}",  # Google Cloud goes upstream
        }
        assert location == expected[client]
        await conn.close()


async def _send_and_read(port: int, raw: bytes) -> int:
    client = await AsyncClient.connect(port)
    await client.send(raw)
    response = await client.read_response()
    await client.close()
    return response.status


async def test_every_answer_is_counted_by_status_refusals_included(tmp_path: Path) -> None:
    async with server_with_mirror(tmp_path) as (server, _mirror):
        port = port_of(server)
        statuses = [
            await _send_and_read(port, b"NOT HTTP\r\n\r\n"),
            await _send_and_read(port, b"GET /v2/" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n"),
            await _send_and_read(port, b"GET /v2/ HTTP/1.1\r\nX-Big: " + b"b" * 17000 + b"\r\n\r\n"),
            await _send_and_read(port, request_bytes("GET", "/v2/")),
        ]
        assert statuses == [400, engines.refusal(414), engines.refusal(431), 200]
        snapshot = server.exporter.snapshot()
        counted = {(kind, status): n for kind, _decision, status, n in snapshot["requests"]}
        refused = {status: n for (kind, status), n in counted.items() if kind == "http"}
        assert sum(refused.values()) == 3
        assert refused == {400: 1, 414: 1, 431: 1} if engines.current() == "httptools" else {400: 3}
        assert counted[("other", 200)] == 1


async def test_gauges_tell_connections_mid_request_from_requests_awaiting_a_check(tmp_path: Path) -> None:
    async with server_with_mirror(tmp_path, ARCHEIO_HEADER_TIMEOUT="60") as (server, mirror):
        port = port_of(server)
        slow = [await AsyncClient.connect(port) for _ in range(5)]
        for client in slow:
            await client.send(b"GET /v2/ HTTP/1.1\r\nX-Slow: ")
        mirror.mode = GATE
        mirror.present.add(BLOB)
        waiting = await AsyncClient.connect(port)
        await waiting.send(request_bytes("GET", blob_path(BLOB), xff(AWS_EU_WEST_3), close=False))
        await wait_until(lambda: mirror.total_heads == 1, "the HEAD to be held")

        def gauges() -> dict[str, int]:
            return dict(server.exporter.snapshot()["connections"])

        await wait_until(lambda: gauges()["reading"] == 5, "five connections mid-request")
        assert gauges() == {"open": 6, "idle": 0, "reading": 5, "lingering": 0, "busy": 1, "awaiting_check": 1}
        mirror.release()
        assert (await waiting.read_response()).status == 307
        await wait_until(lambda: gauges()["awaiting_check"] == 0, "the check to end")
        assert gauges()["idle"] == 1
        for client in [*slow, waiting]:
            await client.close()


async def test_shutdown_waits_for_a_check_in_flight_before_closing_the_client_session(tmp_path: Path) -> None:
    mirror = FakeMirror()
    await mirror.start()
    mirror.mode = GATE
    mirror.present.add(BLOB)
    settings = settings_from(server_env(mirror.url, mirror.url, tmp_path, ARCHEIO_GRACE_PERIOD="10"))
    sock = bind(settings)
    server = Server(settings)
    run = asyncio.get_running_loop().create_task(server.run(sock))
    try:
        await wait_until(lambda: server.ready, "the server to start")
        client = await AsyncClient.connect(sock.getsockname()[1])
        await client.send(request_bytes("GET", blob_path(BLOB), xff(AWS_EU_WEST_3), close=False))
        await wait_until(lambda: mirror.total_heads == 1, "the HEAD to be held")
        await client.close()  # the client gives up; its check is still in flight
        assert server.flow is not None
        cache = server.flow.cache
        server.stopping.set()
        await asyncio.sleep(0.3)
        assert not run.done(), "the server stopped with a check in flight"
        mirror.release()
        await asyncio.wait_for(run, 30)
        # The HEAD was answered, not cut off by a closed session.
        assert dict(cache.outcomes) == {(mirror.url, "hit"): 1}
    finally:
        server.stopping.set()
        mirror.release()
        await asyncio.wait_for(run, 30)
        await mirror.close()


async def test_no_task_of_the_server_outlives_it_when_the_grace_period_ends_mid_check(tmp_path: Path) -> None:
    mirror = FakeMirror()
    await mirror.start()
    mirror.mode = GATE
    settings = settings_from(server_env(mirror.url, mirror.url, tmp_path, ARCHEIO_GRACE_PERIOD="0.5"))
    sock = bind(settings)
    server = Server(settings)
    before = asyncio.all_tasks()
    run = asyncio.get_running_loop().create_task(server.run(sock))
    client = None
    try:
        await wait_until(lambda: server.ready, "the server to start")
        client = await AsyncClient.connect(sock.getsockname()[1])
        await client.send(request_bytes("GET", blob_path(BLOB), xff(AWS_EU_WEST_3), close=False))
        await wait_until(lambda: mirror.total_heads == 1, "the HEAD to be held")
        server.stopping.set()
        await asyncio.wait_for(run, 30)
        left = [
            task for task in asyncio.all_tasks() - before - {run}
            if task.get_coro().__qualname__ != "FakeMirror.answer"  # type: ignore[union-attr]
        ]
        assert not left, left
    finally:
        server.stopping.set()
        await asyncio.wait_for(run, 30)
        if client is not None:
            await client.close()
        await mirror.close()


async def test_aiohttp_engine_handler_answers_through_pytest_aiohttp_fixtures(
    aiohttp_raw_server: Any, aiohttp_client: Any, tmp_path: Path,
) -> None:
    # The aiohttp engine's handler on pytest-aiohttp's own raw server: the
    # flow's decisions as aiohttp renders them, without our connection wrapper.
    from archeio.app import RequestFlow
    from archeio.existence import BlobExistenceCache
    from archeio.http.aiohttp_impl import AiohttpEngine
    from iprange import load_index

    settings = settings_from(server_env("http://127.0.0.1:1/bucket", "http://127.0.0.1:1/cdn", tmp_path))
    flow = RequestFlow(settings, load_index(settings.ranges_dir), BlobExistenceCache.from_settings(settings))
    handler = AiohttpEngine(flow, settings, asyncio.get_running_loop())._handle
    client = await aiohttp_client(await aiohttp_raw_server(handler))
    manifest = await client.get("/v2/pause/manifests/1", allow_redirects=False)
    assert (manifest.status, manifest.headers["Location"]) == (307, f"{UPSTREAM}/v2/{REGISTRY_PATH}/pause/manifests/1")
    root = await client.head("/v2/")
    assert root.status == 200 and root.headers["Content-Length"] == "2"
    refused = await client.get("/v2/_catalog")
    assert refused.status == 404 and (await refused.json())["errors"][0]["code"] == "UNSUPPORTED"


def test_the_date_header_is_an_imf_fixdate_as_email_utils_writes_it() -> None:
    from email.utils import formatdate

    from archeio.http.answers import http_date

    for when in (0.0, 784111777.0, 951782400.5, 1796565000.0, 4102444799.0):  # 2000-02-29 among them
        assert http_date(when) == formatdate(when, usegmt=True)
