"""Real clients pull real images through `archeio serve`; the servers' logs say where from.

Every pull goes through nginx, which plays Google's load balancer for one
simulated client location per listener (`X-Forwarded-For: <client>, 127.0.0.1`),
or, for the oras SDK, sets that header itself. After each pull the request
logs of the registry and of the S3 server must show every blob served by
the right place: the bucket of the client's region when it holds the blob,
the source registry otherwise. A pull that works but came from the wrong
place fails.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import oras.provider
import pytest
import requests

from . import images
from .clients import (
    assert_served_from_right_place,
    expected_place,
    layout_blob,
    pulled_digest,
    skopeo_copy,
    skopeo_inspect,
)
from .images import Image
from .places import Places
from .services import Archeio, Proxy, Registry
from .topology import CLIENTS, PAGINATED_TAGS, UPSTREAM_PATH, Catalog

pytestmark = pytest.mark.integration

ALL_CLIENTS = sorted(CLIENTS)


# -- skopeo ------------------------------------------------------------------------


@pytest.mark.parametrize("client", ALL_CLIENTS)
@pytest.mark.parametrize("image_name", ["alpha", "beta"])
def test_skopeo_copy_by_tag_fetches_each_blob_from_the_clients_place(
    proxy: Proxy, catalog: Catalog, places: Places, tmp_path: Path, client: str, image_name: str,
) -> None:
    image: Image = getattr(catalog, image_name)
    mark = places.mark()
    tag = "v1"
    layout = skopeo_copy(proxy, client, f"{image.name}:{tag}", tmp_path / "out")
    assert pulled_digest(layout) == image.digest
    for blob in image.blobs:
        assert layout_blob(layout, blob.digest) == blob.data
    assert_served_from_right_place(places, mark, catalog, client, image.blobs)


@pytest.mark.parametrize("client", ALL_CLIENTS)
def test_skopeo_copy_by_digest_fetches_each_blob_from_the_clients_place(
    proxy: Proxy, catalog: Catalog, places: Places, tmp_path: Path, client: str,
) -> None:
    image = catalog.alpha
    mark = places.mark()
    layout = skopeo_copy(proxy, client, f"{image.name}@{image.digest}", tmp_path / "out")
    assert pulled_digest(layout) == image.digest
    assert_served_from_right_place(places, mark, catalog, client, image.blobs)


@pytest.mark.parametrize("client", ALL_CLIENTS)
def test_skopeo_inspect_by_tag_and_digest_reports_the_pushed_digest(
    proxy: Proxy, catalog: Catalog, client: str,
) -> None:
    image = catalog.beta
    by_tag = json.loads(skopeo_inspect(proxy, client, f"{image.name}:v1"))
    by_digest = json.loads(skopeo_inspect(proxy, client, f"{image.name}@{image.digest}"))
    assert by_tag["Digest"] == by_digest["Digest"] == image.digest
    assert by_tag["Layers"] == [blob.digest for blob in image.layers]
    raw = skopeo_inspect(proxy, client, f"{image.name}:v1", "--raw")
    assert raw.encode() == image.manifest.data


# -- the multi-platform index ---------------------------------------------------------


@pytest.mark.parametrize("client", ["aws_region_one", "aws_region_two"])
def test_multi_platform_index_copies_all_platforms_from_the_clients_place(
    proxy: Proxy, catalog: Catalog, places: Places, tmp_path: Path, client: str,
) -> None:
    """Region one's bucket holds the index's blobs, region two's does not."""
    image = catalog.multi
    mark = places.mark()
    layout = skopeo_copy(proxy, client, f"{image.name}:v1", tmp_path / "out", "--all")
    assert pulled_digest(layout) == image.digest
    assert layout_blob(layout, image.digest) == image.manifest.data
    for child in image.children:
        assert layout_blob(layout, child.digest) == child.manifest.data
    assert_served_from_right_place(places, mark, catalog, client, image.blobs)


def test_multi_platform_index_raw_lists_both_platforms(proxy: Proxy, catalog: Catalog) -> None:
    raw = skopeo_inspect(proxy, "google_cloud", f"{catalog.multi.name}:v1", "--raw").encode()
    assert hashlib.sha256(raw).hexdigest() == catalog.multi.digest.removeprefix("sha256:")
    platforms = {(m["platform"]["os"], m["platform"]["architecture"]) for m in json.loads(raw)["manifests"]}
    assert platforms == {("linux", "amd64"), ("linux", "arm64")}


def test_multi_platform_copy_of_one_platform_fetches_only_its_blobs(
    proxy: Proxy, catalog: Catalog, places: Places, tmp_path: Path,
) -> None:
    image = catalog.multi
    arm64 = next(c for c in image.children if c.platform and c.platform.architecture == "arm64")
    amd64 = next(c for c in image.children if c is not arm64)
    mark = places.mark()
    layout = skopeo_copy(
        proxy, "aws_region_one", f"{image.name}:v1", tmp_path / "out", "--override-arch", "arm64",
    )
    assert pulled_digest(layout) == arm64.digest
    assert_served_from_right_place(places, mark, catalog, "aws_region_one", arm64.blobs)
    for blob in amd64.blobs:
        assert not places.blob_gets_since(mark, blob.digest), f"amd64 blob {blob.digest} was fetched"


# -- the oras Python SDK ---------------------------------------------------------------


@pytest.mark.parametrize("client", ALL_CLIENTS)
def test_oras_fetches_manifest_and_blob_with_its_own_forwarded_header(
    archeio: Archeio, catalog: Catalog, places: Places, client: str,
) -> None:
    image = catalog.alpha
    registry = oras.provider.Registry(archeio.host, insecure=True)
    # What the load balancer would append: the client, then itself.
    registry.set_header("X-Forwarded-For", f"{CLIENTS[client]}, 127.0.0.1")
    reference = f"{archeio.host}/{image.name}:v1"
    mark = places.mark()
    manifest = registry.get_manifest(reference)
    assert image.config is not None and manifest["config"]["digest"] == image.config.digest
    layer = image.layers[0]
    response = registry.get_blob(reference, layer.digest)
    assert response.status_code == 200
    assert "sha256:" + hashlib.sha256(response.content).hexdigest() == layer.digest
    assert_served_from_right_place(places, mark, catalog, client, (layer,))


# -- tags, signatures, HEAD ---------------------------------------------------------------


def test_tag_listing_with_n_and_last_reaches_the_registry_unchanged(
    proxy: Proxy, catalog: Catalog, registry: Registry,
) -> None:
    """Each page request is redirected with its `n`/`last` query intact.

    distribution 2.8 (Debian's docker-registry) answers every tag whatever
    `n` and `last` say (paging tag lists came in distribution 3), so what
    is checked here is archeio's part: the Location it gives and the query
    the registry's log shows it received.
    """
    path = f"/v2/{catalog.alpha.name}/tags/list"
    queries = ["n=2", "n=2&last=v2", "last=v4&n=2"]
    mark = registry.log.mark()
    listed: set[str] = set()
    for query in queries:
        response = requests.get(f"{proxy.urls['unknown']}{path}?{query}", allow_redirects=False, timeout=10)
        assert response.status_code == 307
        location = response.headers["Location"]
        assert location == f"{registry.url}/v2/{UPSTREAM_PATH}/{catalog.alpha.name}/tags/list?{query}"
        page = requests.get(location, timeout=10)
        assert page.status_code == 200
        listed.update(page.json()["tags"])
    assert listed >= set(PAGINATED_TAGS)
    received = [r.query for r in registry.log.since(mark) if r.path.endswith(path.removeprefix("/v2"))]
    assert received == queries


def test_skopeo_lists_every_tag_through_the_redirect(proxy: Proxy, catalog: Catalog) -> None:
    listed = json.loads(images.skopeo(
        "list-tags", "--tls-verify=false", "--no-creds", f"docker://{proxy.host('google_cloud')}/alpha",
    ).stdout)
    signature = images.signature_tag(catalog.alpha.digest)
    # The signature lives in the signature registry only; tag lists go to the source registry.
    assert sorted(listed["Tags"]) == sorted(PAGINATED_TAGS) and signature not in listed["Tags"]


def test_signature_tag_is_served_by_the_signature_registry(
    proxy: Proxy, catalog: Catalog, registry: Registry, signature_registry: Registry,
) -> None:
    tag = images.signature_tag(catalog.alpha.digest)
    mark, signature_mark = registry.log.mark(), signature_registry.log.mark()
    raw = skopeo_inspect(proxy, "aws_region_one", f"alpha:{tag}", "--raw")
    assert raw.encode() == catalog.signature.manifest.data
    layer = json.loads(raw)["layers"][0]
    assert layer["annotations"][images.COSIGN_SIGNATURE_ANNOTATION]
    assert any(r.path.endswith(f"/manifests/{tag}") for r in signature_registry.log.since(signature_mark))
    assert not any(r.path.endswith(f"/manifests/{tag}") for r in registry.log.since(mark))


def test_head_of_manifest_follows_the_redirect_to_the_registry(
    proxy: Proxy, catalog: Catalog, registry: Registry,
) -> None:
    mark = registry.log.mark()
    response = requests.head(
        f"{proxy.urls['aws_region_two']}/v2/alpha/manifests/v1", allow_redirects=True, timeout=10,
        headers={"Accept": images.OCI_MANIFEST},
    )
    assert response.status_code == 200
    assert response.headers["Docker-Content-Digest"] == catalog.alpha.digest
    assert [r.method for r in registry.log.since(mark) if r.path.endswith("/alpha/manifests/v1")] == ["HEAD"]


@pytest.mark.parametrize("client", ["aws_region_one", "google_cloud"])
def test_head_of_blob_is_answered_by_the_clients_place(
    proxy: Proxy, catalog: Catalog, places: Places, client: str,
) -> None:
    blob = catalog.alpha.layers[1]
    url = f"{proxy.urls[client]}/v2/alpha/blobs/{blob.digest}"
    # Warm archeio's existence cache first, so that the only HEAD the
    # bucket sees after the mark is the client's, not archeio's own check.
    assert requests.get(url, allow_redirects=False, timeout=10).status_code == 307
    mark = places.mark()
    response = requests.head(url, allow_redirects=True, timeout=10)
    assert response.status_code == 200
    assert int(response.headers["Content-Length"]) == len(blob.data)
    heads = places.blob_requests_since(mark, blob.digest, "HEAD")
    assert heads == {expected_place(catalog, client, blob.digest): 1}
    assert not places.blob_gets_since(mark, blob.digest)


def test_blob_request_without_the_load_balancers_entry_is_refused(
    archeio: Archeio, catalog: Catalog, places: Places,
) -> None:
    """One X-Forwarded-For entry: the request did not come through the load balancer."""
    blob = catalog.alpha.layers[0]
    mark = places.mark()
    response = requests.get(
        f"{archeio.url}/v2/alpha/blobs/{blob.digest}", headers={"X-Forwarded-For": CLIENTS["aws_region_one"]},
        allow_redirects=False, timeout=10,
    )
    assert response.status_code == 400
    assert "Location" not in response.headers
    assert response.json()["errors"][0]["code"]
    assert not places.blob_requests_since(mark, blob.digest, "HEAD")
