"""Failing mirrors: blob requests still get a correct redirect, and the breaker works.

The server is the real one, in this event loop; the mirror is a FakeMirror
on loopback that hangs, resets, answers 500/503 or answers slowly on
command. Latency is shown bounded by the HEAD deadline through the
server's own behaviour, not a clock: the mirror never answers, yet every
blob request gets its answer, and that answer is the upstream redirect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from archeio.existence import (
    BREAKER_OPEN,
    CLOSED,
    ERROR,
    FORBIDDEN,
    HALF_OPEN,
    MISS,
    OPEN,
    TIMEOUT,
    BlobExistenceCache,
)
from archeio.metrics import render
from archeio.server import Server

from .reliability_support import (
    AWS_EU_WEST_3,
    GATE,
    HANG,
    OK,
    REGISTRY_PATH,
    RESET,
    SLOW,
    STATUS,
    UPSTREAM,
    FakeMirror,
    blob_path,
    digest,
    exchange,
    fetch,
    free_port,
    request_bytes,
    running_server,
    served_process,
    server_env,
    settings_from,
    wait_until,
    xff,
)

# Every test here runs on each HTTP engine (tests/engines.py).
pytestmark = pytest.mark.usefixtures("engine")

BREAKER_FAILURES = 3


@dataclass
class World:
    server: Server
    mirror: FakeMirror

    @property
    def port(self) -> int:
        assert self.server.port is not None
        return self.server.port

    @property
    def cache(self) -> BlobExistenceCache:
        assert self.server.flow is not None
        return self.server.flow.cache

    def breaker_state(self) -> str:
        breaker = self.cache.breakers.get(self.mirror.url)
        return CLOSED if breaker is None else breaker.state

    async def blob(self, n: int) -> str:
        """The Location a client in eu-west-3 is sent to for blob n."""
        response = await fetch(self.port, blob_path(digest(n)), xff(AWS_EU_WEST_3))
        assert response.status == 307, response
        location = response.header("Location")
        assert location is not None
        return location

    def mirror_location(self, n: int) -> str:
        return f"{self.mirror.url}/containers/images/{digest(n)}"


def upstream_location(n: int) -> str:
    return f"{UPSTREAM}/v2/{REGISTRY_PATH}/pause/blobs/{digest(n)}"


@contextlib.asynccontextmanager
async def start_world(tmp_path: Path, **env: str) -> AsyncIterator[World]:
    mirror = FakeMirror()
    await mirror.start()
    settings = settings_from(server_env(
        mirror.url, mirror.url.replace("/bucket", "/cdn"), tmp_path,
        ARCHEIO_BREAKER_FAILURES=str(BREAKER_FAILURES), **env,
    ))
    try:
        async with running_server(settings) as server:
            yield World(server, mirror)
    finally:
        await mirror.close()


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    """Short HEAD deadline, long cool-down: an opened breaker stays open for the test."""
    async with start_world(tmp_path, ARCHEIO_HEAD_TIMEOUT="0.3", ARCHEIO_BREAKER_COOLDOWN="3600") as w:
        yield w


@pytest.fixture
async def quick_world(tmp_path: Path) -> AsyncIterator[World]:
    """A cool-down short enough to wait for by polling."""
    async with start_world(tmp_path, ARCHEIO_HEAD_TIMEOUT="0.3", ARCHEIO_BREAKER_COOLDOWN="0.2") as w:
        yield w


async def test_hanging_mirror_blob_answers_arrive_as_upstream_redirects(world: World) -> None:
    world.mirror.present.update(digest(n) for n in range(20))
    world.mirror.mode = HANG
    locations = await asyncio.gather(*(world.blob(n) for n in range(20)))
    # The mirror never answered, so only the HEAD deadline can have ended
    # these checks; each answer is the correct fallback.
    assert locations == [upstream_location(n) for n in range(20)]
    assert world.cache.count(TIMEOUT) == 20
    assert world.mirror.total_heads == 20


@pytest.mark.parametrize("status", [500, 503])
async def test_mirror_server_error_sends_blob_upstream(world: World, status: int) -> None:
    world.mirror.present.add(digest(1))
    world.mirror.mode, world.mirror.status = STATUS, status
    assert await world.blob(1) == upstream_location(1)
    assert world.cache.count(ERROR) == 1


async def test_forbidden_answer_sends_blob_upstream_counted_apart_from_a_miss(world: World) -> None:
    # S3 answers 403 for a key it lacks when the reader may not list the
    # bucket, and for every key when a policy denies reads.
    world.mirror.present.add(digest(1))
    world.mirror.mode, world.mirror.status = STATUS, 403
    assert await world.blob(1) == upstream_location(1)
    assert world.cache.outcomes[world.mirror.url, FORBIDDEN] == 1
    assert world.cache.count(MISS) == 0
    # Like a miss, it is remembered: no second HEAD within the miss TTL.
    assert await world.blob(1) == upstream_location(1)
    assert world.mirror.total_heads == 1


async def test_forbidden_answers_do_not_open_the_breaker(world: World) -> None:
    world.mirror.mode, world.mirror.status = STATUS, 403
    for n in range(BREAKER_FAILURES * 3):
        assert await world.blob(n) == upstream_location(n)
    assert world.breaker_state() == CLOSED
    assert world.mirror.total_heads == BREAKER_FAILURES * 3  # every blob was still asked about


async def test_existence_metrics_name_the_mirror_and_the_forbidden_outcome(world: World) -> None:
    world.mirror.mode, world.mirror.status = STATUS, 403
    await world.blob(1)
    world.mirror.mode = OK
    await world.blob(2)
    text = render(world.server).decode()
    mirror = world.mirror.url
    assert f'archeio_existence_checks_total{{mirror="{mirror}",outcome="forbidden"}} 1.0' in text
    assert f'archeio_existence_checks_total{{mirror="{mirror}",outcome="miss"}} 1.0' in text
    assert f'archeio_existence_check_seconds_count{{mirror="{mirror}",outcome="forbidden"}} 1.0' in text
    assert f'archeio_existence_cache_entries{{mirror="{mirror}",cache="misses"}} 2.0' in text


async def test_resetting_mirror_sends_blob_upstream(world: World) -> None:
    world.mirror.present.add(digest(1))
    world.mirror.mode = RESET
    assert await world.blob(1) == upstream_location(1)
    assert world.cache.count(ERROR) == 1


async def test_slow_mirror_within_deadline_is_still_used(tmp_path: Path) -> None:
    async with start_world(tmp_path, ARCHEIO_HEAD_TIMEOUT="30") as w:
        w.mirror.present.add(digest(1))
        w.mirror.mode, w.mirror.delay = SLOW, 0.2
        assert await w.blob(1) == w.mirror_location(1)


async def test_slow_mirror_past_deadline_sends_blob_upstream(world: World) -> None:
    world.mirror.present.add(digest(1))
    world.mirror.mode, world.mirror.delay = SLOW, 3600
    assert await world.blob(1) == upstream_location(1)
    assert world.cache.count(TIMEOUT) == 1


async def test_breaker_opens_after_repeated_failures_and_stops_heads(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="archeio.existence")
    world.mirror.present.update(digest(n) for n in range(100))
    world.mirror.mode, world.mirror.status = STATUS, 503
    for n in range(BREAKER_FAILURES):
        assert world.breaker_state() == CLOSED
        assert await world.blob(n) == upstream_location(n)
    assert world.breaker_state() == OPEN
    assert f"mirror {world.mirror.url} circuit breaker open" in caplog.messages
    # Open: no more HEADs there, every blob goes upstream, even a healthy
    # mirror's, until the cool-down is over.
    world.mirror.mode = OK
    for n in range(BREAKER_FAILURES, 100):
        assert await world.blob(n) == upstream_location(n)
    assert world.mirror.total_heads == BREAKER_FAILURES
    assert world.cache.count(BREAKER_OPEN) == 100 - BREAKER_FAILURES


async def test_breaker_is_per_mirror(world: World) -> None:
    # Clients with no regional mirror use the default (/cdn on the same fake
    # server): its breaker is its own and stays closed.
    world.mirror.present.update(digest(n) for n in range(10))
    world.mirror.mode, world.mirror.status = STATUS, 500
    for n in range(BREAKER_FAILURES):
        await world.blob(n)
    assert world.breaker_state() == OPEN
    world.mirror.mode = OK
    response = await fetch(world.port, blob_path(digest(9)), xff("192.168.0.1"))
    cdn = world.mirror.url.replace("/bucket", "/cdn")
    assert response.header("Location") == f"{cdn}/containers/images/{digest(9)}"
    assert world.cache.breakers[cdn].state == CLOSED


async def test_open_breaker_probes_after_cooldown_and_recovered_mirror_is_used_again(
    quick_world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="archeio.existence")
    w = quick_world
    w.mirror.present.update(digest(n) for n in range(1000))
    w.mirror.mode = RESET
    for n in range(BREAKER_FAILURES):
        await w.blob(n)
    assert w.breaker_state() == OPEN
    heads_when_opened = w.mirror.total_heads
    w.mirror.mode = OK
    # Ask until the cool-down has passed and the probe has closed the breaker.
    n = 100
    while w.breaker_state() != CLOSED:
        n += 1
        assert n < 100_000, "the breaker never probed the mirror"
        await w.blob(n)
    assert w.mirror.total_heads == heads_when_opened + 1  # exactly one probe
    assert await w.blob(999) == w.mirror_location(999)
    assert caplog.messages[-2:] == [
        f"mirror {w.mirror.url} circuit breaker {HALF_OPEN}", f"mirror {w.mirror.url} circuit breaker {CLOSED}",
    ]


async def test_failed_probe_reopens_breaker(quick_world: World) -> None:
    w = quick_world
    w.mirror.present.update(digest(n) for n in range(1000))
    w.mirror.mode, w.mirror.status = STATUS, 503
    for n in range(BREAKER_FAILURES):
        await w.blob(n)
    heads_when_opened = w.mirror.total_heads
    await wait_until(lambda: w.breaker_state() == OPEN, "the breaker to open")
    # The probe fails: one HEAD, and the breaker is open again.
    n = 100
    while w.mirror.total_heads == heads_when_opened:
        n += 1
        assert await w.blob(n) == upstream_location(n)
    assert w.mirror.total_heads == heads_when_opened + 1
    assert w.breaker_state() == OPEN


async def test_stuck_check_does_not_delay_cached_or_manifest_answers(tmp_path: Path) -> None:
    async with start_world(tmp_path, ARCHEIO_HEAD_TIMEOUT="3600") as w:
        w.mirror.present.add(digest(1))
        assert await w.blob(1) == w.mirror_location(1)  # now cached as a hit
        w.mirror.mode = GATE
        pending = asyncio.ensure_future(w.blob(2))  # held by the mirror until released
        await wait_until(lambda: w.mirror.in_flight == 1, "the HEAD to reach the mirror")
        # While that check is stuck, a cached blob and a manifest are answered.
        assert await w.blob(1) == w.mirror_location(1)
        manifest = await fetch(w.port, "/v2/pause/manifests/latest")
        assert manifest.status == 307
        assert not pending.done()
        w.mirror.release()
        assert await pending == upstream_location(2)


def test_breaker_state_is_a_metric(tmp_path: Path) -> None:
    with served_process(
        tmp_path, ARCHEIO_ADMIN_PORT=str(free_port()), ARCHEIO_ADMIN_HOST="127.0.0.1",
        ARCHEIO_BREAKER_FAILURES=str(BREAKER_FAILURES), ARCHEIO_BREAKER_COOLDOWN="3600",
    ) as (server, configured, mirror):
        mirror.mode, mirror.status = STATUS, 503
        for n in range(BREAKER_FAILURES):
            response = exchange(server.port, request_bytes("GET", blob_path(digest(n)), xff(AWS_EU_WEST_3)))
            assert response.header("Location") == upstream_location(n)
        open_line = f'archeio_mirror_breaker_state{{mirror="{mirror.url}",state="open"}} 1.0'
        admin = f"http://127.0.0.1:{configured.admin_port}/metrics"
        deadline = time.monotonic() + 30
        while open_line not in (text := urllib.request.urlopen(admin, timeout=30).read().decode()):
            assert time.monotonic() < deadline, text
            time.sleep(0.05)
        assert f"mirror {mirror.url} circuit breaker open" in server.messages()
