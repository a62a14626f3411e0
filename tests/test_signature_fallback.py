"""The signature fallback over real sockets: content by digest the regional upstream lacks.

The server runs in-process on each HTTP engine. The stand-in bucket
(tests/bucket.py) is both the mirrors (eu-west-3's and the default) and, at
its root, the regional upstream registry, so its HEAD counts show every
check the server made, in the mirror and in the upstream. The signature
upstream is a name only: the server redirects there and never asks it.
The decisions themselves are tabled in tests/test_routing.py.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from archeio.existence import REGISTRY_ACCEPT
from archeio.metrics import render

from .conftest import AWS_EU_WEST_3, GOOGLE_CLOUD, NOBODY, make_settings

# Every test here runs on each HTTP engine (tests/engines.py).
pytestmark = pytest.mark.usefixtures("engine")

PATH = "k8s-artifacts-prod/images"
SIGNATURES = "http://signatures.example"
SIG_UP = f"{SIGNATURES}/v2/{PATH}/"
HELD = "sha256:" + "1" * 64  # in the upstream's `pause` (and, where a test says so, in a mirror)
SIGNATURE = "sha256:" + "2" * 64  # only in the signature upstream


def lb(client: str) -> dict[str, str]:
    return {"X-Forwarded-For": f"{client},130.211.0.1"}


@pytest.fixture
async def serve(start_server: Any, bucket: Any, tmp_path: Path) -> Any:
    """A server whose mirrors and regional upstream are the stand-in bucket, with a signature upstream."""
    bucket.add_to_registry(f"{PATH}/pause", HELD)
    mirrors = tmp_path / "mirrors.toml"
    mirrors.write_text(f'[mirrors.AWS]\n"eu-west-3" = "{bucket.base("eu")}"\n')
    settings = make_settings(
        PORT="0", ARCHEIO_HOST="127.0.0.1", ARCHEIO_ACCESS_LOG="1",
        UPSTREAM_REGISTRY_ENDPOINT=bucket.url, UPSTREAM_REGISTRY_PATH=PATH,
        SIGNATURE_UPSTREAM_ENDPOINT=SIGNATURES,
        DEFAULT_AWS_BASE_URL=bucket.base("cdn"), ARCHEIO_MIRRORS_FILE=str(mirrors),
    )
    return await start_server(settings)


async def location(server: Any, path: str, method: str = "GET", headers: dict[str, str] | None = None) -> str:
    async with aiohttp.ClientSession() as session:
        async with session.request(method, server.url + path, headers=headers, allow_redirects=False) as response:
            assert response.status == 307, await response.text()
            return response.headers["Location"]


def upstream(bucket: Any, rest: str) -> str:
    return f"{bucket.url}/v2/{PATH}/{rest}"


async def test_manifest_by_digest_the_upstream_holds_stays_there(serve: Any, bucket: Any) -> None:
    server = serve
    assert await location(server, f"/v2/pause/manifests/{HELD}") == upstream(bucket, f"pause/manifests/{HELD}")
    assert bucket.heads == {f"registry/{PATH}/pause/{HELD}": 1}
    assert bucket.accepts[f"registry/{PATH}/pause/{HELD}"] == REGISTRY_ACCEPT


async def test_manifest_by_digest_the_upstream_lacks_goes_to_the_signature_upstream(serve: Any, bucket: Any) -> None:
    server = serve
    for method in ("GET", "HEAD", "GET"):
        assert await location(server, f"/v2/pause/manifests/{SIGNATURE}", method) == (
            SIG_UP + f"pause/manifests/{SIGNATURE}")
    assert bucket.heads == {f"registry/{PATH}/pause/{SIGNATURE}": 1}  # "absent" is remembered


async def test_aws_blob_no_mirror_holds_is_checked_in_its_mirror_then_the_upstream(serve: Any, bucket: Any) -> None:
    server = serve
    got = await location(server, f"/v2/pause/blobs/{SIGNATURE}", headers=lb(AWS_EU_WEST_3))
    assert got == SIG_UP + f"pause/blobs/{SIGNATURE}"
    assert bucket.heads == {f"eu/{SIGNATURE}": 1, f"registry/{PATH}/pause/{SIGNATURE}": 1}


async def test_aws_blob_in_its_mirror_never_asks_the_upstream(serve: Any, bucket: Any) -> None:
    server = serve
    bucket.add("eu", HELD)
    assert await location(server, f"/v2/pause/blobs/{HELD}", headers=lb(AWS_EU_WEST_3)) == (
        f"{bucket.base('eu')}/containers/images/{HELD}")
    assert bucket.heads == {f"eu/{HELD}": 1}


async def test_unknown_clients_blob_the_upstream_holds_goes_there_after_the_default_mirror(
    serve: Any, bucket: Any,
) -> None:
    server = serve
    got = await location(server, f"/v2/pause/blobs/{HELD}", headers=lb(NOBODY))
    assert got == upstream(bucket, f"pause/blobs/{HELD}")
    assert bucket.heads == {f"cdn/{HELD}": 1, f"registry/{PATH}/pause/{HELD}": 1}


async def test_google_cloud_clients_blob_is_checked_only_in_the_upstream(serve: Any, bucket: Any) -> None:
    server = serve
    bucket.add("eu", SIGNATURE)
    bucket.add("cdn", SIGNATURE)
    got = await location(server, f"/v2/pause/blobs/{SIGNATURE}", headers=lb(GOOGLE_CLOUD))
    assert got == SIG_UP + f"pause/blobs/{SIGNATURE}"
    assert bucket.heads == {f"registry/{PATH}/pause/{SIGNATURE}": 1}


async def test_a_failing_upstream_sends_content_by_digest_to_the_signature_upstream(serve: Any, bucket: Any) -> None:
    server = serve
    bucket.status = 503
    assert await location(server, f"/v2/pause/manifests/{HELD}") == SIG_UP + f"pause/manifests/{HELD}"


async def test_tags_are_never_checked(serve: Any, bucket: Any) -> None:
    server = serve
    assert await location(server, "/v2/pause/manifests/v1") == upstream(bucket, "pause/manifests/v1")
    tag = "sha256-" + "1" * 64 + ".sig"
    assert await location(server, f"/v2/pause/manifests/{tag}") == SIG_UP + f"pause/manifests/{tag}"
    assert bucket.heads == {}


async def test_fallback_is_a_backend_in_the_metrics(serve: Any) -> None:
    server = serve
    await location(server, f"/v2/pause/manifests/{SIGNATURE}")
    await location(server, f"/v2/pause/manifests/{SIGNATURE}")  # the second from the cache
    await location(server, f"/v2/pause/blobs/{SIGNATURE}", headers=lb(GOOGLE_CLOUD))
    text = render(server.server).decode()
    assert 'archeio_requests_total{kind="manifest",decision="signature_fallback",status="307"} 2.0' in text
    assert 'archeio_requests_total{kind="blob",decision="signature_fallback",status="307"} 1.0' in text
    assert ('archeio_blob_decisions_total{cloud="GCP",region="europe-north1",decision="signature_fallback"} 1.0'
            in text)


async def test_fallback_is_the_backend_of_its_access_log_line(serve: Any, caplog: pytest.LogCaptureFixture) -> None:
    server = serve
    with caplog.at_level(logging.INFO, logger="archeio.access"):
        await location(server, f"/v2/pause/manifests/{SIGNATURE}")
    [line] = [r for r in caplog.records if r.name == "archeio.access"]
    fields = line.fields  # type: ignore[attr-defined]
    assert (fields["kind"], fields["backend"], fields["location"]) == (
        "manifest", "signature_fallback", SIG_UP + f"pause/manifests/{SIGNATURE}")
