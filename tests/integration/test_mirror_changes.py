"""A blob deleted from its bucket after archeio found it there: pulls recover once the cache forgets.

archeio remembers a blob found in a mirror for ARCHEIO_CACHE_HIT_TTL; until
then it keeps sending clients to the bucket, which now answers 404. This
module starts its own archeio with a one-second hit TTL (and its own nginx)
and polls archeio's answer until it points at the registry, then pulls.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from . import services
from .clients import assert_served_from_right_place, pulled_digest, skopeo_copy
from .places import Places
from .services import Archeio, Proxy, Registry, S3Server
from .topology import BUCKET_OF_CLIENT, CLIENTS, Catalog, archeio_settings

pytestmark = pytest.mark.integration

CLIENT = "aws_region_one"


@pytest.fixture(scope="module")
def short_memory_proxy(
    workdir: Path, registry: Registry, signature_registry: Registry, s3: S3Server, catalog: Catalog,
    archeio: Archeio,
) -> Iterator[Proxy]:
    """nginx in front of an archeio that remembers found blobs for one second (the session archeio's engine)."""
    engine = archeio.env["ARCHEIO_HTTP"]
    settings = archeio_settings(
        workdir, registry, signature_registry, s3, ARCHEIO_CACHE_HIT_TTL="1", ARCHEIO_HTTP=engine
    )
    with (
        services.archeio_server(workdir, settings, name=f"archeio-short-ttl-{engine}") as short,
        services.nginx_proxy(workdir, short.url, CLIENTS, name=f"nginx-short-ttl-{engine}") as proxy,
    ):
        yield proxy


@pytest.fixture
def doomed_in_bucket(s3: S3Server, catalog: Catalog) -> Iterator[str]:
    """The bucket of CLIENT, holding every blob of the doomed image; put back afterwards."""
    bucket = BUCKET_OF_CLIENT[CLIENT]
    assert bucket is not None
    yield bucket
    for blob in catalog.doomed.blobs:
        s3.put_public(bucket, services.blob_key(blob.digest), blob.data)
        catalog.buckets.setdefault(bucket, set()).add(blob.digest)


def redirect_target(url: str) -> str:
    response = requests.get(url, allow_redirects=False, timeout=10)
    assert response.status_code == 307, response.text
    return response.headers["Location"]


def test_blob_deleted_from_the_bucket_is_pulled_from_the_registry_once_the_cache_entry_expires(
    short_memory_proxy: Proxy, proxy: Proxy, catalog: Catalog, places: Places, registry: Registry,
    s3: S3Server, tmp_path: Path, doomed_in_bucket: str,
) -> None:
    image = catalog.doomed
    bucket = doomed_in_bucket
    assert all(catalog.bucket_holds(bucket, b.digest) for b in image.blobs)
    mark = places.mark()
    skopeo_copy(short_memory_proxy, CLIENT, f"{image.name}:v1", tmp_path / "before")
    assert_served_from_right_place(places, mark, catalog, CLIENT, image.blobs)
    blob_urls = {b.digest: f"/v2/{image.name}/blobs/{b.digest}" for b in image.blobs}
    # The session's archeio (hit TTL one hour) learns the blobs are in the bucket too.
    for path in blob_urls.values():
        assert redirect_target(proxy.urls[CLIENT] + path).startswith(s3.bucket_url(bucket) + "/")

    for blob in image.blobs:
        s3.delete(bucket, services.blob_key(blob.digest))
        catalog.buckets[bucket].discard(blob.digest)

    # What the TTL bounds: with a long one, clients are still sent to a bucket that answers 404.
    stale = redirect_target(proxy.urls[CLIENT] + blob_urls[image.layers[0].digest])
    assert stale.startswith(s3.bucket_url(bucket) + "/")
    assert requests.get(stale, timeout=10).status_code == 404
    # With a one-second TTL, archeio checks again and sends clients to the registry.
    for path in blob_urls.values():
        services.wait_until(
            lambda path=path: redirect_target(short_memory_proxy.urls[CLIENT] + path).startswith(
                registry.url + "/"
            ),
            what=f"archeio to forget that {path} was in {bucket}", timeout=30,
        )
    mark = places.mark()
    layout = skopeo_copy(short_memory_proxy, CLIENT, f"{image.name}:v1", tmp_path / "after")
    assert pulled_digest(layout) == image.digest
    assert_served_from_right_place(places, mark, catalog, CLIENT, image.blobs)
