"""The public port over real sockets: the request flow, caching, limits.

The server is the real protocol started in-process on a loopback port; the
bucket is a real local HTTP server (tests/bucket.py) whose HEAD counts
show what the existence cache did.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from . import engines
from .conftest import AWS_EU_WEST_3, GOOGLE_CLOUD, NOBODY, make_settings
from .reliability_support import RawResponse, parse_response

# Every test here runs on each HTTP engine (tests/engines.py).
pytestmark = pytest.mark.usefixtures("engine")

UP = "http://upstream.example/v2/k8s-artifacts-prod/images/"
D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


def lb(client: str) -> dict[str, str]:
    """The header Google's load balancer sends: `<client>,<lb>`."""
    return {"X-Forwarded-For": f"{client},130.211.0.1"}


@pytest.fixture
async def serve(start_server: Any, bucket: Any, tmp_path: Path) -> Any:
    """Start a server whose eu-west-3 mirror and default mirror are the stand-in bucket."""

    async def start(**env: str) -> Any:
        mirrors = tmp_path / "mirrors.toml"
        mirrors.write_text(f'[mirrors.AWS]\n"eu-west-3" = "{bucket.base("eu")}"\n')
        settings = make_settings(
            PORT="0", ARCHEIO_HOST="127.0.0.1",
            UPSTREAM_REGISTRY_ENDPOINT="http://upstream.example",
            DEFAULT_AWS_BASE_URL=bucket.base("cdn"),
            ARCHEIO_MIRRORS_FILE=str(mirrors),
            **env,
        )
        return await start_server(settings)

    return start


async def fetch(server: Any, path: str, method: str = "GET", headers: dict[str, str] | None = None,
                ) -> tuple[int, str | None, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.request(method, server.url + path, headers=headers, allow_redirects=False) as r:
            return r.status, r.headers.get("Location"), dict(r.headers), await r.read()


async def test_v2_root_answers_200_with_api_version(serve: Any) -> None:
    server = await serve()
    status, _, headers, _ = await fetch(server, "/v2/")
    assert status == 200
    assert headers["Docker-Distribution-Api-Version"] == "registry/2.0"


async def test_manifest_redirects_upstream_with_query_kept(serve: Any) -> None:
    server = await serve()
    status, location, _, _ = await fetch(server, "/v2/kubernetes/pause/tags/list?n=2&last=3.9")
    assert (status, location) == (307, UP + "kubernetes/pause/tags/list?n=2&last=3.9")


async def test_head_manifest_redirects_too(serve: Any) -> None:
    server = await serve()
    status, location, _, body = await fetch(server, "/v2/pause/manifests/3.9", "HEAD")
    assert (status, location, body) == (307, UP + "pause/manifests/3.9", b"")


async def test_error_answers_carry_oci_json(serve: Any) -> None:
    server = await serve()
    status, _, headers, body = await fetch(server, "/v2/_catalog")
    assert status == 404 and headers["Content-Type"] == "application/json"
    assert json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"
    status, _, headers, body = await fetch(server, "/v2/", "POST")
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    assert json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"


async def test_head_error_has_length_but_no_body(serve: Any) -> None:
    server = await serve()
    status, _, headers, body = await fetch(server, "/nope", "HEAD")
    assert status == 404 and body == b"" and int(headers["Content-Length"]) > 0


async def test_blob_in_regional_mirror_redirects_there(serve: Any, bucket: Any) -> None:
    bucket.add("eu", D1)
    server = await serve()
    status, location, _, _ = await fetch(server, f"/v2/pause/blobs/{D1}", headers=lb(AWS_EU_WEST_3))
    assert (status, location) == (307, f"{bucket.base('eu')}/containers/images/{D1}")


async def test_nested_repository_blob_head_request(serve: Any, bucket: Any) -> None:
    bucket.add("eu", D1)
    server = await serve()
    status, location, _, _ = await fetch(
        server, f"/v2/kubernetes/pause/blobs/{D1}", "HEAD", headers=lb(AWS_EU_WEST_3)
    )
    assert (status, location) == (307, f"{bucket.base('eu')}/containers/images/{D1}")


async def test_blob_missing_from_mirror_goes_upstream(serve: Any, bucket: Any) -> None:
    server = await serve()
    status, location, _, _ = await fetch(server, f"/v2/pause/blobs/{D1}", headers=lb(AWS_EU_WEST_3))
    assert (status, location) == (307, UP + f"pause/blobs/{D1}")
    assert bucket.heads[f"eu/{D1}"] == 1


async def test_google_cloud_client_goes_upstream_without_head(serve: Any, bucket: Any) -> None:
    bucket.add("eu", D1)
    bucket.add("cdn", D1)
    server = await serve()
    status, location, _, _ = await fetch(server, f"/v2/pause/blobs/{D1}", headers=lb(GOOGLE_CLOUD))
    assert (status, location) == (307, UP + f"pause/blobs/{D1}")
    assert sum(bucket.heads.values()) == 0


async def test_unknown_client_gets_default_mirror(serve: Any, bucket: Any) -> None:
    bucket.add("cdn", D1)
    server = await serve()
    status, location, _, _ = await fetch(server, f"/v2/pause/blobs/{D1}", headers=lb(NOBODY))
    assert (status, location) == (307, f"{bucket.base('cdn')}/containers/images/{D1}")


async def test_no_forwarded_header_uses_peer_address(serve: Any, bucket: Any) -> None:
    bucket.add("cdn", D1)
    server = await serve()
    # The peer is 127.0.0.1: nobody's range, so the default mirror.
    status, location, _, _ = await fetch(server, f"/v2/pause/blobs/{D1}")
    assert (status, location) == (307, f"{bucket.base('cdn')}/containers/images/{D1}")


@pytest.mark.parametrize("header", ["35.180.1.1", "garbage,130.211.0.1", "1.2.3.4/8, 130.211.0.1"])
async def test_unusable_forwarded_header_is_400(serve: Any, header: str) -> None:
    server = await serve()
    status, location, _, body = await fetch(server, f"/v2/pause/blobs/{D1}", headers={"X-Forwarded-For": header})
    assert status == 400 and location is None
    assert json.loads(body)["errors"]


async def test_client_is_second_to_last_entry_not_the_forgeable_first(serve: Any, bucket: Any) -> None:
    bucket.add("eu", D1)
    server = await serve()
    headers = {"X-Forwarded-For": f"{GOOGLE_CLOUD}, {AWS_EU_WEST_3} ,130.211.0.1"}
    _, location, _, _ = await fetch(server, f"/v2/pause/blobs/{D1}", headers=headers)
    assert location == f"{bucket.base('eu')}/containers/images/{D1}"


async def test_trusted_hops_setting_picks_another_entry(serve: Any, bucket: Any) -> None:
    bucket.add("eu", D1)
    server = await serve(ARCHEIO_TRUSTED_HOPS="2")
    headers = {"X-Forwarded-For": f"{AWS_EU_WEST_3}, 10.0.0.1, 130.211.0.1"}
    _, location, _, _ = await fetch(server, f"/v2/pause/blobs/{D1}", headers=headers)
    assert location == f"{bucket.base('eu')}/containers/images/{D1}"


async def test_ipv4_mapped_client_is_routed_as_ipv4(serve: Any, bucket: Any) -> None:
    bucket.add("eu", D1)
    server = await serve()
    _, location, _, _ = await fetch(server, f"/v2/pause/blobs/{D1}", headers=lb("::ffff:" + AWS_EU_WEST_3))
    assert location == f"{bucket.base('eu')}/containers/images/{D1}"


async def test_ipv6_aws_client_gets_its_regional_mirror(serve: Any, bucket: Any) -> None:
    bucket.add("eu", D1)
    server = await serve()
    _, location, _, _ = await fetch(server, f"/v2/pause/blobs/{D1}", headers=lb("2a05:d012::1"))
    assert location == f"{bucket.base('eu')}/containers/images/{D1}"


async def test_ipv6_unknown_client(serve: Any, bucket: Any) -> None:
    bucket.add("cdn", D1)
    server = await serve()
    # An IPv6 address of no provider gets the default mirror, like IPv4 ones.
    _, location, _, _ = await fetch(server, f"/v2/pause/blobs/{D1}", headers=lb("2001:db8::1"))
    assert location == f"{bucket.base('cdn')}/containers/images/{D1}"


async def test_sha512_blob_is_checked_and_mirrored(serve: Any, bucket: Any) -> None:
    digest = "sha512:" + "c" * 128
    bucket.add("eu", digest)
    server = await serve()
    _, location, _, _ = await fetch(server, f"/v2/pause/blobs/{digest}", headers=lb(AWS_EU_WEST_3))
    assert location == f"{bucket.base('eu')}/containers/images/{digest}"


async def test_malformed_digest_is_refused_without_a_head(serve: Any, bucket: Any) -> None:
    server = await serve()
    digest = "sha256:" + "A" * 64
    status, location, _, body = await fetch(server, f"/v2/pause/blobs/{digest}", headers=lb(AWS_EU_WEST_3))
    assert (status, location) == (400, None)
    assert json.loads(body)["errors"][0]["code"] == "DIGEST_INVALID"
    assert sum(bucket.heads.values()) == 0


async def test_digest_of_an_unknown_algorithm_goes_upstream_without_a_head(serve: Any, bucket: Any) -> None:
    server = await serve()
    digest = "blake3:" + "a" * 64
    _, location, _, _ = await fetch(server, f"/v2/pause/blobs/{digest}", headers=lb(AWS_EU_WEST_3))
    assert location == UP + f"pause/blobs/{digest}"
    assert sum(bucket.heads.values()) == 0


async def test_hits_are_cached(serve: Any, bucket: Any) -> None:
    bucket.add("eu", D1)
    server = await serve()
    for _ in range(5):
        _, location, _, _ = await fetch(server, f"/v2/pause/blobs/{D1}", headers=lb(AWS_EU_WEST_3))
        assert location == f"{bucket.base('eu')}/containers/images/{D1}"
    assert bucket.heads[f"eu/{D1}"] == 1


async def test_misses_are_cached(serve: Any, bucket: Any) -> None:
    server = await serve()
    for _ in range(5):
        await fetch(server, f"/v2/pause/blobs/{D2}", headers=lb(AWS_EU_WEST_3))
    assert bucket.heads[f"eu/{D2}"] == 1


async def test_concurrent_requests_share_one_head(serve: Any, bucket: Any) -> None:
    bucket.add("eu", D1)
    bucket.delay = 0.3
    server = await serve()
    results = await asyncio.gather(*(
        fetch(server, f"/v2/pause/blobs/{D1}", headers=lb(AWS_EU_WEST_3)) for _ in range(20)
    ))
    assert {r[1] for r in results} == {f"{bucket.base('eu')}/containers/images/{D1}"}
    assert bucket.heads[f"eu/{D1}"] == 1


async def test_slow_mirror_is_cut_off_at_head_deadline(serve: Any, bucket: Any) -> None:
    bucket.add("eu", D1)
    bucket.delay = 5.0
    server = await serve(ARCHEIO_HEAD_TIMEOUT="0.2")
    status, location, _, _ = await fetch(server, f"/v2/pause/blobs/{D1}", headers=lb(AWS_EU_WEST_3))
    assert (status, location) == (307, UP + f"pause/blobs/{D1}")
    assert server.flow.cache.count("timeout") == 1


async def test_failed_check_is_not_remembered_as_a_miss_for_long(serve: Any, bucket: Any) -> None:
    bucket.add("eu", D1)
    bucket.status = 503
    server = await serve(ARCHEIO_CACHE_ERROR_TTL="0.2", ARCHEIO_CACHE_MISS_TTL="3600")
    _, location, _, _ = await fetch(server, f"/v2/pause/blobs/{D1}", headers=lb(AWS_EU_WEST_3))
    assert location == UP + f"pause/blobs/{D1}"
    bucket.status = None
    # Once the short error TTL has passed, the blob is checked again and found.
    for _ in range(100):
        _, location, _, _ = await fetch(server, f"/v2/pause/blobs/{D1}", headers=lb(AWS_EU_WEST_3))
        if location != UP + f"pause/blobs/{D1}":
            break
        await asyncio.sleep(0.05)
    assert location == f"{bucket.base('eu')}/containers/images/{D1}"
    assert bucket.heads[f"eu/{D1}"] == 2


async def raw_exchange(server: Any, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(payload)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), timeout=10)
    writer.close()
    return data


async def test_pipelined_requests_are_answered_in_order(serve: Any, bucket: Any) -> None:
    bucket.add("eu", D1)
    bucket.delay = 0.2
    server = await serve()
    xff = f"X-Forwarded-For: {AWS_EU_WEST_3}, 130.211.0.1\r\n"
    payload = (
        b"GET /v2/a/manifests/1 HTTP/1.1\r\nHost: x\r\n\r\n"
        + f"GET /v2/b/blobs/{D1} HTTP/1.1\r\nHost: x\r\n{xff}\r\n".encode()
        + b"GET /v2/c/manifests/3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    data = await raw_exchange(server, payload)
    locations = [line.split(b" ", 1)[1] for line in data.split(b"\r\n") if line.startswith(b"Location:")]
    assert locations == [
        (UP + "a/manifests/1").encode(),
        f"{bucket.base('eu')}/containers/images/{D1}".encode(),
        (UP + "c/manifests/3").encode(),
    ]


async def raw_response(server: Any, payload: bytes, head: bool = False) -> RawResponse:
    """The one response to `payload` on a connection the server then closes."""
    response, rest = parse_response(await raw_exchange(server, payload), head)
    assert rest == b""
    return response


async def test_connection_close_is_honoured(serve: Any) -> None:
    server = await serve()
    response = await raw_response(server, b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert response.status == 200 and response.header("Connection") == "close"


async def test_http10_request_is_answered_and_closed(serve: Any) -> None:
    server = await serve()
    response = await raw_response(server, b"GET /v2/a/manifests/1 HTTP/1.0\r\n\r\n")
    assert response.status == 307 and response.announces_close


async def test_oversized_request_line_is_refused(serve: Any) -> None:
    server = await serve()
    response = await raw_response(server, b"GET /v2/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert response.status == engines.refusal(414)


async def test_one_header_over_the_limit_is_refused(serve: Any) -> None:
    server = await serve()
    response = await raw_response(server, b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * 17000 + b"\r\n\r\n")
    assert response.status == engines.refusal(431)


async def test_headers_over_the_limit_together_are_refused_by_the_lean_engine_only(serve: Any) -> None:
    # Named difference "header-size-limit": the lean engine limits all
    # header bytes together; aiohttp limits each name and value (and their number).
    server = await serve()
    headers = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"v" * 1000) for i in range(20))
    response = await raw_response(
        server, b"GET /v2/ HTTP/1.1\r\nHost: x\r\n" + headers + b"Connection: close\r\n\r\n"
    )
    assert response.status == (431 if engines.current() == "httptools" else 200)


# The documented limits at their edges: at the limit answered, one byte past refused.
EDGE_LIMITS = {"ARCHEIO_MAX_REQUEST_LINE": "100", "ARCHEIO_MAX_HEADER_BYTES": "200"}


@pytest.mark.parametrize("past", [0, 1], ids=["at-the-limit", "one-byte-past"])
async def test_request_target_limit_holds_at_its_edge(serve: Any, past: int) -> None:
    server = await serve(**EDGE_LIMITS)
    prefix = "/v2/a/manifests/"
    target = prefix + "t" * (100 - len(prefix) + past)
    assert len(target) == 100 + past
    response = await raw_response(server, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    if past:
        assert response.status == engines.refusal(414)
    else:
        assert response.status == 307 and response.header("Location") == UP + target[len("/v2/"):]


@pytest.mark.parametrize("past", [0, 1], ids=["at-the-limit", "one-byte-past"])
async def test_request_header_limit_holds_at_its_edge(serve: Any, past: int) -> None:
    # The lean engine counts every header line's bytes ("Name: value\r\n"),
    # all together; aiohttp bounds each field's value (named difference
    # "header-size-limit").
    server = await serve(**EDGE_LIMITS)
    fixed = b"Host: x\r\nConnection: close\r\n"
    if engines.current() == "httptools":
        value = b"v" * (200 - len(fixed) - len(b"X-Filler: \r\n") + past)
        assert len(fixed + b"X-Filler: " + value + b"\r\n") == 200 + past
    else:
        value = b"v" * (200 + past)
    response = await raw_response(server, b"GET /v2/ HTTP/1.1\r\n" + fixed + b"X-Filler: " + value + b"\r\n\r\n")
    assert response.status == (engines.refusal(431) if past else 200)


async def test_garbage_gets_400(serve: Any) -> None:
    server = await serve()
    response = await raw_response(server, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n")
    assert response.status == 400 and response.announces_close


async def test_percent_encoded_traversal_is_refused(serve: Any) -> None:
    server = await serve()
    response = await raw_response(
        server, b"GET /v2/%2e%2e/%2e%2e/manifests/1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert response.status == 400 and b"NAME_INVALID" in response.body


async def test_slow_headers_are_cut_off(serve: Any) -> None:
    server = await serve(ARCHEIO_HEADER_TIMEOUT="0.3")
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")  # never finishes the headers
    await writer.drain()
    # The housekeeping sweep closes it; the read then ends with nothing.
    assert await asyncio.wait_for(reader.read(), timeout=10) == b""
    writer.close()
