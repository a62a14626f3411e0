"""Every answer we accepted a request for is sent, in order, whatever comes after it.

Regressions of the public port (issue 10), on both engines: before, a blob
request waiting for its existence HEAD lost its answer, and every answer
behind it, when a malformed request, a 65th pipelined request or bytes
after `Connection: close` followed on the same connection; a long pipeline
ending in a small unfinished head got a false 431; and one client's burst
was answered in one go while every other client waited.

The mirror holds every HEAD until the test releases it (GATE), so the
blob's check is surely in flight while the rest arrives.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from .reliability_support import (
    AWS_EU_WEST_3,
    GATE,
    REGISTRY_PATH,
    UPSTREAM,
    AsyncClient,
    FakeMirror,
    blob_path,
    closed_by_server,
    digest,
    port_of,
    request_bytes,
    server_with_mirror,
    wait_until,
    xff,
)

# Every test here runs on each HTTP engine (tests/engines.py).
pytestmark = pytest.mark.usefixtures("engine")

BLOB = digest(1)


def manifest(n: int | str, close: bool = False) -> bytes:
    return request_bytes("GET", f"/v2/pause/manifests/{n}", close=close)


def manifest_location(n: int | str) -> str:
    return f"{UPSTREAM}/v2/{REGISTRY_PATH}/pause/manifests/{n}"


async def held_blob_then(client: AsyncClient, mirror: FakeMirror, rest: bytes) -> None:
    """Send a blob request whose HEAD the mirror holds, then `rest`; release the HEAD once `rest` is sent."""
    mirror.mode = GATE
    mirror.present.add(BLOB)
    await client.send(request_bytes("GET", blob_path(BLOB), xff(AWS_EU_WEST_3), close=False) + rest)
    await wait_until(lambda: mirror.total_heads == 1, "the blob's HEAD to reach the mirror")
    # Not a wait for readiness: the order under test needs the server to have
    # read what followed while the HEAD is still held.
    await asyncio.sleep(0.2)
    mirror.release()


async def read_blob_answer(client: AsyncClient, mirror: FakeMirror) -> None:
    response = await client.read_response()
    assert (response.status, response.header("Location")) == (307, f"{mirror.url}/containers/images/{BLOB}")


async def test_malformed_request_behind_a_waiting_check_is_refused_after_the_answers_before_it(
    tmp_path: Path,
) -> None:
    async with server_with_mirror(tmp_path) as (server, mirror):
        client = await AsyncClient.connect(port_of(server))
        await held_blob_then(client, mirror, manifest(2) + b"NOT HTTP AT ALL\r\n\r\n")
        await read_blob_answer(client, mirror)
        second = await client.read_response()
        assert (second.status, second.header("Location")) == (307, manifest_location(2))
        refusal = await client.read_response()
        assert refusal.status == 400 and refusal.announces_close
        assert await closed_by_server(client)
        await client.close()


async def test_hundreds_of_requests_pipelined_behind_a_waiting_check_are_all_answered_in_order(
    tmp_path: Path,
) -> None:
    async with server_with_mirror(tmp_path) as (server, mirror):
        client = await AsyncClient.connect(port_of(server))
        await held_blob_then(client, mirror, b"".join(manifest(n) for n in range(300)))
        await read_blob_answer(client, mirror)
        for n in range(300):
            response = await client.read_response()
            assert (response.status, response.header("Location")) == (307, manifest_location(n))
        # The connection is still good for more.
        assert (await client.get("/v2/")).status == 200
        await client.close()


async def test_bytes_after_a_close_request_behind_a_waiting_check_cost_no_answer(tmp_path: Path) -> None:
    async with server_with_mirror(tmp_path) as (server, mirror):
        client = await AsyncClient.connect(port_of(server))
        await held_blob_then(client, mirror, manifest(2, close=True) + b"TRAILING GARBAGE\r\n\r\n")
        await read_blob_answer(client, mirror)
        last = await client.read_response()
        assert (last.status, last.header("Location")) == (307, manifest_location(2))
        assert last.header("Connection") == "close"
        assert await closed_by_server(client)
        await client.close()


async def test_long_pipeline_ending_in_a_small_unfinished_head_is_not_refused(tmp_path: Path) -> None:
    # About 190 KB of complete requests in one send, then the start of one
    # more: only the unfinished request's bytes count against the limit.
    async with server_with_mirror(tmp_path) as (server, _mirror):
        client = await AsyncClient.connect(port_of(server))
        count = 3000
        await client.send(b"".join(manifest(n) for n in range(count)) + b"GET /v2/pause/manif")
        for n in range(count):
            response = await client.read_response()
            assert (response.status, response.header("Location")) == (307, manifest_location(n))
        await client.send(b"ests/last HTTP/1.1\r\nHost: x\r\n\r\n")
        last = await client.read_response()
        assert (last.status, last.header("Location")) == (307, manifest_location("last"))
        await client.close()


async def test_a_pipelined_burst_is_answered_a_bounded_number_per_turn_of_the_loop(tmp_path: Path) -> None:
    # The server runs in this event loop: count the answers it gives between
    # two turns of the loop while one client's burst is being answered.
    async with server_with_mirror(tmp_path) as (server, _mirror):
        flow = server.flow
        assert flow is not None
        client = await AsyncClient.connect(port_of(server))
        count = 1200  # about 66 KB: a read or two
        per_turn: list[int] = []
        done = asyncio.Event()

        async def count_per_turn() -> None:
            last = sum(flow.requests.values())
            while not done.is_set():
                await asyncio.sleep(0)
                now = sum(flow.requests.values())
                per_turn.append(now - last)
                last = now

        counter = asyncio.get_running_loop().create_task(count_per_turn())
        await client.send(b"".join(manifest(n) for n in range(count)))
        for _ in range(count):
            await client.read_response()
        done.set()
        await counter
        await client.close()
        assert sum(per_turn) == count
        # The lean engine answers at most 32 a turn per connection (twice
        # that when a read and a scheduled turn meet); aiohttp pauses its
        # parser at 32 queued requests.
        assert max(per_turn) <= 64, sorted(per_turn)[-5:]
