"""Abuse: digest floods, slow and idle connections, oversized requests, SIGTERM under load.

What each test proves, through what the server does rather than a clock:
- a flood of random well-formed digests costs at most one HEAD per
  (digest, mirror) per negative-cache TTL;
- no more than `head_concurrency` HEADs are in flight, and requests beyond
  that are answered (upstream) while the capped HEADs are still held;
- idle and slow (slowloris) connections do not stop new clients from being
  answered, and the header deadline closes them, body included;
- oversized request lines, headers and garbage are refused (414/431/400)
  as soon as the limit is passed, not after buffering the whole input;
- SIGTERM while requests are in flight: every accepted request is answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import tracemalloc
from pathlib import Path

import pytest

from archeio.existence import OVER_CAPACITY

from . import engines
from .reliability_support import (
    AWS_EU_WEST_3,
    GATE,
    NOBODY,
    REGISTRY_PATH,
    UPSTREAM,
    AsyncClient,
    RawResponse,
    ServerProcess,
    blob_path,
    closed_by_server,
    digest,
    fetch,
    mirror_in_thread,
    port_of,
    server_env,
    server_with_mirror,
    settings_from,
    wait_until,
    xff,
)

# Every test here runs on each HTTP engine (tests/engines.py).
pytestmark = pytest.mark.usefixtures("engine")


def upstream_blob(n: int) -> str:
    return f"{UPSTREAM}/v2/{REGISTRY_PATH}/pause/blobs/{digest(n)}"


# -- digest floods ---------------------------------------------------------------


async def test_random_digest_flood_costs_one_head_per_digest_and_mirror(tmp_path: Path) -> None:
    # 1,000 requests: 250 random digests, each asked 4 times, by clients of
    # two mirrors (eu-west-3 and the default), 50 connections at once.
    rng = random.Random(7)
    digests = [rng.getrandbits(256) for _ in range(250)]
    clients = [AWS_EU_WEST_3] * 125 + [NOBODY] * 125
    requests = [(d, c) for d, c in zip(digests, clients, strict=True) for _ in range(4)]
    rng.shuffle(requests)
    async with server_with_mirror(tmp_path, ARCHEIO_CACHE_MISS_TTL="3600") as (server, mirror):
        port = port_of(server)
        queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
        for item in requests:
            queue.put_nowait(item)

        async def worker() -> None:
            client = await AsyncClient.connect(port)
            try:
                while not queue.empty():
                    n, who = queue.get_nowait()
                    response = await client.get(blob_path(digest(n)), xff(who))
                    assert response.header("Location") == upstream_blob(n)
            finally:
                await client.close()

        await asyncio.gather(*(worker() for _ in range(50)))
        per_thousand = mirror.total_heads * 1000 // len(requests)
        print(f"\nHEADs per 1,000 flood requests (250 digests x 4, two mirrors): {per_thousand}")
        assert max(mirror.heads.values()) == 1
        assert len(mirror.heads) == 250  # each (digest, mirror) exactly once


async def test_check_started_after_another_head_finished_reuses_its_answer(tmp_path: Path) -> None:
    # Regression: `cached` said "unknown", then another request's HEAD for
    # the same blob finished before this request's check task ran; the
    # check must use that answer, not send a second HEAD (the flood above
    # found this as 2 HEADs for a few digests).
    async with server_with_mirror(tmp_path) as (server, mirror):
        assert server.flow is not None
        cache = server.flow.cache
        assert cache.cached(mirror.url, digest(1)) is None
        assert await cache.check(mirror.url, digest(1)) is False  # the other request's HEAD
        assert await cache.check(mirror.url, digest(1)) is False  # this request's check
        assert mirror.total_heads == 1


async def test_concurrent_heads_are_capped_and_excess_requests_go_upstream_at_once(tmp_path: Path) -> None:
    async with server_with_mirror(
        tmp_path, ARCHEIO_HEAD_CONCURRENCY="4", ARCHEIO_HEAD_TIMEOUT="3600"
    ) as (server, mirror):
        port = port_of(server)
        mirror.present.update(digest(n) for n in range(40))
        mirror.mode = GATE  # every HEAD is held until released
        tasks = [asyncio.ensure_future(fetch(port, blob_path(digest(n)), xff(AWS_EU_WEST_3))) for n in range(40)]
        # 36 answers arrive while the 4 capped HEADs are still held: they
        # did not queue behind them.
        await wait_until(
            lambda: sum(t.done() for t in tasks) == 36 and mirror.in_flight == 4,
            "36 answers beyond the cap while 4 HEADs are held",
        )
        assert mirror.max_in_flight == 4
        early = [t.result() for t in tasks if t.done()]
        assert all((r.header("Location") or "").startswith(f"{UPSTREAM}/v2/") for r in early)
        assert server.flow is not None
        assert server.flow.cache.count(OVER_CAPACITY) == 36
        mirror.release()
        late = await asyncio.gather(*(t for t in tasks if not t.done()))
        assert all(f"{mirror.url}/containers/images/" in (r.header("Location") or "") for r in late)
        assert mirror.max_in_flight == 4


# -- idle and slow connections ------------------------------------------------


async def open_slow_connections(port: int, count: int, prefix: bytes) -> list[AsyncClient]:
    clients = [await AsyncClient.connect(port) for _ in range(count)]
    for client in clients:
        if prefix:
            await client.send(prefix)
    return clients


SLOWLORIS_HEADERS = b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Slow: "
SLOW_BODY = b"POST /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\nabc"


async def test_idle_and_slowloris_connections_do_not_block_new_clients(tmp_path: Path) -> None:
    # A header deadline far away, so the held connections stay open: the
    # new client is answered while all of them are held.
    async with server_with_mirror(tmp_path, ARCHEIO_HEADER_TIMEOUT="3600") as (server, _mirror):
        port = port_of(server)
        held = (await open_slow_connections(port, 150, b"")
                + await open_slow_connections(port, 150, SLOWLORIS_HEADERS)
                + await open_slow_connections(port, 150, SLOW_BODY))
        assert server.engine is not None
        tracker = server.engine.tracker
        await wait_until(lambda: len(tracker.open) >= 450, "the server to hold 450 connections")
        response = await fetch(port, "/v2/pause/manifests/latest")
        assert response.status == 307
        response = await fetch(port, blob_path(digest(1)), xff(AWS_EU_WEST_3))
        assert response.status == 307
        for client in held:
            await client.close()


@pytest.mark.parametrize("prefix", [
    pytest.param(b"", id="idle-connection"),
    pytest.param(SLOWLORIS_HEADERS, id="unfinished-headers"),
    pytest.param(SLOW_BODY, id="unfinished-body"),
])
async def test_header_deadline_closes_slow_connections(tmp_path: Path, prefix: bytes) -> None:
    async with server_with_mirror(tmp_path, ARCHEIO_HEADER_TIMEOUT="0.5") as (server, _mirror):
        port = port_of(server)
        clients = await open_slow_connections(port, 20, prefix)
        # Keep trickling: a byte more does not buy more time.
        for client in clients[:10]:
            with contextlib.suppress(ConnectionError):
                await client.send(b"a")
        results = await asyncio.gather(*(closed_by_server(c) for c in clients))
        assert all(results)
        assert server.engine is not None
        tracker = server.engine.tracker
        # A byte of garbage on an idle connection is a malformed request: its
        # 400 is answered and that connection lingers until its client closes.
        assert tracker.gauges()["open"] == tracker.gauges()["lingering"]
        for client in clients:
            await client.close()
        await wait_until(lambda: not tracker.open, "every connection to end once its client closed")


async def test_connection_limit_closes_longest_idle_connection_for_a_new_client(tmp_path: Path) -> None:
    async with server_with_mirror(tmp_path, ARCHEIO_MAX_CONNECTIONS="50") as (server, _mirror):
        port = port_of(server)
        idle = []
        for _ in range(50):
            client = await AsyncClient.connect(port)
            assert (await client.get("/v2/")).status == 200
            idle.append(client)
        newcomer = await fetch(port, "/v2/pause/manifests/latest")
        assert newcomer.status == 307
        assert await closed_by_server(idle[0])  # the longest idle one made room
        assert (await idle[-1].get("/v2/")).status == 200
        for client in idle:
            await client.close()


# -- oversized input --------------------------------------------------------------

STREAM_CHUNK = 64 * 1024
STREAM_TOTAL = 256 * 1024 * 1024


async def stream_until_answered(port: int, start: bytes, filler: bytes) -> tuple[RawResponse | None, int]:
    """Send `start` then `filler` chunks until the server answers or closes; (answer, bytes sent)."""
    client = await AsyncClient.connect(port)
    answer = asyncio.ensure_future(client.read_response())
    sent = 0
    try:
        await client.send(start)
        sent += len(start)
        while sent < STREAM_TOTAL and not answer.done():
            await client.send(filler)
            sent += len(filler)
    except ConnectionError:
        pass
    try:
        response: RawResponse | None = await asyncio.wait_for(answer, 30)
    except ConnectionError:
        response = None
    await client.close()
    return response, sent


@pytest.mark.parametrize("start, filler, status", [
    pytest.param(b"GET /v2/", b"a" * STREAM_CHUNK, 414, id="endless-request-line"),
    pytest.param(b"GET /v2/ HTTP/1.1\r\nX-Big: ", b"b" * STREAM_CHUNK, 431, id="endless-header"),
    pytest.param(b"GET /v2/ HTTP/1.1\r\n", b"X-Many: v\r\n" * (STREAM_CHUNK // 11), 431, id="endless-headers"),
    pytest.param(b"\x16\x03\x01", bytes(range(256)) * (STREAM_CHUNK // 256), 400, id="endless-garbage"),
])
async def test_oversized_input_is_refused_before_it_ends(
    tmp_path: Path, start: bytes, filler: bytes, status: int
) -> None:
    async with server_with_mirror(tmp_path) as (server, _mirror):
        response, sent = await stream_until_answered(port_of(server), start, filler)
        # The server decided at its limit, long before the input ended: it
        # cannot have buffered what was never sent.
        assert sent < STREAM_TOTAL
        assert response is not None and response.status == engines.refusal(status)
        assert response.announces_close


# -- memory ------------------------------------------------------------------------


def test_router_does_not_remember_long_paths(tmp_path: Path) -> None:
    # Regression: the router remembered every classified /v2/ path, so
    # 20,000 distinct paths near the 8 KB limit held about 160 MB.
    from archeio.routing import Router

    router = Router(settings_from(server_env("http://127.0.0.1:1/m", "http://127.0.0.1:1/d", tmp_path)))
    router.classify("GET", "/v2/warm/manifests/latest")
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(2000):
            router.classify("GET", f"/v2/{'a' * 7900}{n:08d}/manifests/latest")
        retained = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert retained < 1_000_000, f"{retained} bytes kept for 2,000 long paths"


# -- SIGTERM during load ----------------------------------------------------------


def test_sigterm_answers_every_accepted_request(tmp_path: Path) -> None:
    asyncio.run(_sigterm_under_load(tmp_path))


async def _sigterm_under_load(tmp_path: Path) -> None:
    """Held blob checks plus keep-alive manifest traffic, then SIGTERM.

    Held: 30 blob requests whose HEADs the mirror holds; they were accepted
    (the mirror saw their HEADs) before the signal. Background: 20
    keep-alive clients asking manifests in a loop; a request the server
    accepted must get a whole answer, one it closed before accepting gets
    no byte at all.
    """
    with mirror_in_thread() as mirror:
        mirror.present.update(digest(n) for n in range(30))
        mirror.mode = GATE
        env = server_env(mirror.url, mirror.url.replace("/bucket", "/cdn"), tmp_path, ARCHEIO_HEAD_TIMEOUT="60")
        with ServerProcess(env) as server:
            port = server.port
            held = [asyncio.ensure_future(fetch(port, blob_path(digest(n)), xff(AWS_EU_WEST_3))) for n in range(30)]
            await wait_until(lambda: mirror.total_heads == 30, "30 held HEADs at the mirror")
            stop = asyncio.Event()
            outcomes: list[str] = []

            async def background() -> None:
                client = await AsyncClient.connect(port)
                try:
                    while not stop.is_set():
                        await client.send(b"GET /v2/pause/manifests/latest HTTP/1.1\r\nHost: x\r\n\r\n")
                        try:
                            response = await client.read_response()
                        except ConnectionError as exc:
                            # Closed before any byte: not accepted. Part of
                            # an answer and then closed: a lost request.
                            outcomes.append("not accepted" if "after 0 bytes" in str(exc) else "lost")
                            return
                        outcomes.append("answered" if response.status == 307 else f"status {response.status}")
                finally:
                    await client.close()

            load = [asyncio.ensure_future(background()) for _ in range(20)]
            await wait_until(lambda: len(outcomes) >= 200, "background load to run")
            server.terminate()
            await wait_until(lambda: not _accepts(port), "the server to stop accepting")
            mirror.release()  # the held checks finish during the grace period
            answers = await asyncio.wait_for(asyncio.gather(*held), 60)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*load), 60)
            assert server.proc.wait(60) == 0
    assert [a.header("Location") for a in answers] == [
        f"{mirror.url}/containers/images/{digest(n)}" for n in range(30)
    ]
    assert set(outcomes) <= {"answered", "not accepted"}, sorted(set(outcomes))
    print(f"\nSIGTERM under load: {len(answers)} held blob requests answered, "
          f"{outcomes.count('answered')} background answers, {outcomes.count('not accepted')} refused after the signal")


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            return True
    except OSError:
        return False

