"""ARCHEIO_RATE_LIMIT on the public port, over real sockets, on both HTTP engines.

The rate is one token in 1,000 s, so that no token comes back while a test
runs: a client has its burst and then 429s, whose Retry-After is the time
to the next token, 1,000 s rounded up. The key is the client address as
blobs are routed by (X-Forwarded-For and ARCHEIO_TRUSTED_HOPS), never the
connection: every request here comes from 127.0.0.1.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

from archeio.app import RATE_LIMITED
from archeio.metrics import render
from archeio.routing import LOCAL

from .conftest import make_settings

# Every test here runs on each HTTP engine (tests/engines.py).
pytestmark = pytest.mark.usefixtures("engine")

BURST = 3
ONE_TOKEN_IN = 1000  # seconds
LB = "130.211.0.1"


def via_lb(client: str) -> dict[str, str]:
    return {"X-Forwarded-For": f"{client}, {LB}"}


@pytest.fixture
async def limited(start_server: Any) -> Any:
    async def start(**env: str) -> Any:
        settings = make_settings(
            PORT="0", ARCHEIO_HOST="127.0.0.1", ARCHEIO_RATE_LIMIT=str(1 / ONE_TOKEN_IN),
            ARCHEIO_RATE_BURST=str(BURST), **env,
        )
        return await start_server(settings)

    return start


async def statuses(server: Any, headers: dict[str, str] | None, times: int, path: str = "/v2/") -> list[int]:
    """Status of each of `times` GETs, one after another on one keep-alive connection."""
    found = []
    async with aiohttp.ClientSession() as session:
        for _ in range(times):
            async with session.get(server.url + path, headers=headers, allow_redirects=False) as response:
                await response.read()
                found.append(response.status)
    return found


async def test_a_client_gets_its_burst_then_429(limited: Any) -> None:
    server = await limited()
    assert await statuses(server, via_lb("35.180.1.1"), BURST + 2) == [200] * BURST + [429, 429]


async def test_429_carries_retry_after_and_an_oci_toomanyrequests_body(limited: Any) -> None:
    server = await limited()
    await statuses(server, via_lb("35.180.1.1"), BURST)
    async with aiohttp.ClientSession() as session:
        async with session.get(server.url + "/v2/pause/manifests/3.10", headers=via_lb("35.180.1.1"),
                               allow_redirects=False) as response:
            body = await response.read()
            assert response.status == 429
            assert response.headers["Retry-After"] == str(ONE_TOKEN_IN)
            assert response.headers["Content-Type"] == "application/json"
            assert "Location" not in response.headers
    assert json.loads(body)["errors"][0]["code"] == "TOOMANYREQUESTS"


async def test_head_429_has_the_headers_and_no_body(limited: Any) -> None:
    server = await limited()
    await statuses(server, via_lb("35.180.1.1"), BURST)
    async with aiohttp.ClientSession() as session:
        async with session.head(server.url + "/v2/", headers=via_lb("35.180.1.1")) as response:
            assert response.status == 429 and response.headers["Retry-After"] == str(ONE_TOKEN_IN)
            assert await response.read() == b""


async def test_every_kind_of_request_takes_a_token(limited: Any) -> None:
    server = await limited()
    client = via_lb("35.180.1.1")
    paths = ["/v2/", "/v2/pause/manifests/3.10", "/v2/pause/blobs/sha256:" + "a" * 64]
    found = [(await statuses(server, client, 1, path))[0] for path in paths]
    assert found == [200, 307, 307]
    assert await statuses(server, client, 1, "/nothing/here") == [429]


async def test_clients_are_limited_apart(limited: Any) -> None:
    server = await limited()
    await statuses(server, via_lb("35.180.1.1"), BURST + 1)
    assert await statuses(server, via_lb("35.220.26.1"), BURST + 1) == [200] * BURST + [429]


async def test_the_key_is_the_client_entry_of_x_forwarded_for_not_the_connection(limited: Any) -> None:
    server = await limited()
    # What the client forged in front of its address, and which of our load
    # balancers it came through, change nothing: one client, one bucket.
    await statuses(server, {"X-Forwarded-For": f"1.1.1.1, 35.180.1.1, {LB}"}, 1)
    await statuses(server, {"X-Forwarded-For": "35.180.1.1, 130.211.0.2"}, 1)
    await statuses(server, {"X-Forwarded-For": "2.2.2.2,35.180.1.1 , 130.211.0.3"}, 1)
    assert await statuses(server, via_lb("35.180.1.1"), 1) == [429]


async def test_a_port_written_by_a_proxy_is_not_a_new_client(limited: Any) -> None:
    server = await limited()
    for port in range(1000, 1000 + BURST):
        await statuses(server, via_lb(f"35.180.1.1:{port}"), 1)
    assert await statuses(server, via_lb("35.180.1.1:4242"), 1) == [429]


async def test_with_trusted_hops_0_the_last_entry_is_the_client(limited: Any) -> None:
    server = await limited(ARCHEIO_TRUSTED_HOPS="0")
    await statuses(server, {"X-Forwarded-For": "35.180.1.1"}, BURST)
    assert await statuses(server, {"X-Forwarded-For": "9.9.9.9, 35.180.1.1"}, 1) == [429]
    assert await statuses(server, {"X-Forwarded-For": "35.180.1.1, 9.9.9.9"}, 1) == [200]


@pytest.mark.parametrize(
    "unusable",
    ["35.180.1.1",  # too few entries for one trusted hop: it did not come through the load balancer
     "x" * 65 + ", " + LB],  # an entry too long to be an address
)
async def test_without_a_usable_address_the_peer_is_the_client(limited: Any, unusable: str) -> None:
    server = await limited()
    await statuses(server, None, BURST)  # the peer's bucket, emptied directly
    assert await statuses(server, {"X-Forwarded-For": unusable}, 1) == [429]
    assert await statuses(server, via_lb("35.180.1.1"), 1) == [200]


async def test_use_forwarded_false_limits_by_the_peer(limited: Any) -> None:
    server = await limited(ARCHEIO_USE_FORWARDED="false")
    await statuses(server, via_lb("35.180.1.1"), BURST)
    assert await statuses(server, via_lb("35.220.26.1"), 1) == [429]


async def test_429s_are_counted_as_answers(limited: Any) -> None:
    server = await limited()
    await statuses(server, via_lb("35.180.1.1"), BURST + 4)
    assert server.flow.requests[(RATE_LIMITED, LOCAL, 429)] == 4
    page = render(server.server).decode()
    assert f'archeio_requests_total{{kind="{RATE_LIMITED}",decision="local",status="429"}} 4.0' in page


async def test_buckets_are_bounded_and_the_count_is_exported(limited: Any) -> None:
    server = await limited(ARCHEIO_RATE_CLIENTS="8")
    for i in range(40):  # 40 clients, each a token short: none is full again while the test runs
        await statuses(server, via_lb(f"10.0.0.{i}"), 1)
    limiter = server.flow.limiter
    assert len(limiter) <= 8 and limiter.forgotten == 40 - len(limiter)
    page = render(server.server).decode()
    assert f"archeio_rate_limit_clients {float(len(limiter))}" in page
    assert f"archeio_rate_limit_forgotten_total {float(limiter.forgotten)}" in page


async def test_with_the_limit_off_respond_is_the_flows_own_method(start_server: Any) -> None:
    # Off (the default), nothing is bound in front of the flow: no per-request test of it.
    server = await start_server(make_settings(PORT="0", ARCHEIO_HOST="127.0.0.1"))
    assert "respond" not in vars(server.flow) and server.flow.limiter is None
    assert await statuses(server, via_lb("35.180.1.1"), BURST + 10) == [200] * (BURST + 10)
    samples = [line for line in render(server.server).decode().splitlines() if not line.startswith("#")]
    assert not [line for line in samples if line.startswith("archeio_rate_limit")]
