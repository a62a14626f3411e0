"""Signatures by digest through `archeio serve`: the signature fallback with real registries.

Two real docker-registries: the source (regional) one, which holds the
images but not alpha's cosign signature, and the signature (canonical) one,
which holds the signature (pushed with skopeo by the session's fixtures).
archeio has both configured, so the fallback is on. skopeo, behind nginx
playing the load balancer for one simulated client, copies the signature's
manifest by digest and its blobs, following every 307; the registries' own
access logs say which of them served each GET.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .clients import layout_blob, pulled_digest, skopeo_copy
from .images import Image
from .places import Places
from .services import Proxy, Registry
from .topology import BUCKET_OF_CLIENT, Catalog

pytestmark = pytest.mark.integration


def gets(registry: Registry, mark: int, suffix: str) -> int:
    """GETs answered 200 by `registry` since `mark` whose path ends with `suffix`."""
    return sum(1 for r in registry.log.since(mark) if r.method == "GET" and r.status == 200
               and r.path.endswith(suffix))


@pytest.mark.parametrize("client", ["google_cloud", "aws_region_one", "unknown"])
def test_signature_by_digest_comes_from_the_signature_registry(
    proxy: Proxy, catalog: Catalog, places: Places, registry: Registry, signature_registry: Registry,
    tmp_path: Path, client: str,
) -> None:
    """The source registry lacks it: the manifest and each blob come from the signature registry."""
    signature: Image = catalog.signature
    assert not any(catalog.bucket_holds(BUCKET_OF_CLIENT[client], b.digest) for b in signature.blobs)
    mark, signature_mark = places.mark(), signature_registry.log.mark()
    layout = skopeo_copy(proxy, client, f"alpha@{signature.digest}", tmp_path / "out")
    assert pulled_digest(layout) == signature.digest
    assert layout_blob(layout, signature.digest) == signature.manifest.data
    assert gets(signature_registry, signature_mark, f"/alpha/manifests/{signature.digest}") == 1
    assert gets(registry, mark[0], f"/alpha/manifests/{signature.digest}") == 0
    for blob in signature.blobs:
        assert layout_blob(layout, blob.digest) == blob.data
        assert gets(signature_registry, signature_mark, f"/alpha/blobs/{blob.digest}") == 1, blob.media_type
        # Neither the source registry nor any bucket served it (the bucket may have been asked).
        assert not places.blob_gets_since(mark, blob.digest), blob.media_type


@pytest.mark.parametrize("client", ["google_cloud", "aws_region_two"])
def test_image_by_digest_the_source_registry_holds_stays_there(
    proxy: Proxy, catalog: Catalog, places: Places, registry: Registry, signature_registry: Registry,
    tmp_path: Path, client: str,
) -> None:
    """Present in the source registry: nothing changes (region two's bucket lacks beta's blobs)."""
    image = catalog.beta
    mark, signature_mark = places.mark(), signature_registry.log.mark()
    layout = skopeo_copy(proxy, client, f"{image.name}@{image.digest}", tmp_path / "out")
    assert pulled_digest(layout) == image.digest
    assert gets(registry, mark[0], f"/{image.name}/manifests/{image.digest}") == 1
    for blob in image.blobs:
        assert places.blob_gets_since(mark, blob.digest) == {"registry": 1}, blob.media_type
    assert not [r for r in signature_registry.log.since(signature_mark) if r.method == "GET"]


def test_signature_tag_then_its_digest_as_cosign_fetches_them(
    proxy: Proxy, catalog: Catalog, signature_registry: Registry, tmp_path: Path,
) -> None:
    """cosign's order: the `.sig` tag (to the signature registry), then the manifest by the digest it names."""
    from . import images

    tag = images.signature_tag(catalog.alpha.digest)
    signature_mark = signature_registry.log.mark()
    by_tag = skopeo_copy(proxy, "google_cloud", f"alpha:{tag}", tmp_path / "by-tag")
    digest = pulled_digest(by_tag)
    assert digest == catalog.signature.digest
    by_digest = skopeo_copy(proxy, "google_cloud", f"alpha@{digest}", tmp_path / "by-digest")
    assert layout_blob(by_digest, digest) == catalog.signature.manifest.data
    assert gets(signature_registry, signature_mark, f"/alpha/manifests/{tag}") == 1
    assert gets(signature_registry, signature_mark, f"/alpha/manifests/{digest}") == 1
