"""Fixtures of the integration suite: real servers and real images, once per session.

The session starts two docker-registries (the source registry and a
separate signature registry), one moto S3 server holding three buckets
(two regional mirrors and the default "CDN" mirror), pushes the images of
`Catalog` with skopeo, copies the blobs of some of them into the buckets,
then starts `archeio serve` and an nginx with one listener per simulated
client. Everything is stopped by PID when the session ends.

For pagination, `paged` puts a paginating front (paging_registry.py, the
one sanctioned fake) before each registry and a second `archeio serve`
before those, and adds artifacts referring to alpha for the referrers API.

A missing program fails the tests with a message naming the package to
install; these tests never skip.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..engines import ENGINES
from . import images, services
from .images import Image, Layout, Platform
from .places import Places
from .services import Archeio, MissingTool, Proxy, Registry, S3Server
from .topology import (
    BUCKET_DEFAULT,
    BUCKET_REGION_ONE,
    BUCKET_REGION_TWO,
    CLIENTS,
    PAGINATED_TAGS,
    REFERRER_TYPES,
    UPSTREAM_PATH,
    Catalog,
    PagedWorld,
    archeio_settings,
)


@pytest.fixture(scope="session", autouse=True)
def system_tools() -> dict[str, str]:
    """The programs every integration test needs; fail (never skip) when absent."""
    try:
        return services.require_tools("docker-registry", "skopeo", "nginx")
    except MissingTool as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("integration")


@pytest.fixture(scope="session")
def registry(workdir: Path) -> Iterator[Registry]:
    with services.docker_registry(workdir, "registry") as running:
        yield running


@pytest.fixture(scope="session")
def signature_registry(workdir: Path) -> Iterator[Registry]:
    with services.docker_registry(workdir, "signature-registry") as running:
        yield running


@pytest.fixture(scope="session")
def s3(workdir: Path) -> Iterator[S3Server]:
    with services.s3_server(workdir) as running:
        yield running


def _upload_blobs(s3: S3Server, bucket: str, image: Image, catalog: Catalog) -> None:
    for blob in image.blobs:
        s3.put_public(bucket, services.blob_key(blob.digest), blob.data)
        catalog.buckets.setdefault(bucket, set()).add(blob.digest)


@pytest.fixture(scope="session")
def catalog(workdir: Path, registry: Registry, signature_registry: Registry, s3: S3Server) -> Catalog:
    """Build the images, push them with skopeo, fill the buckets."""
    alpha = images.sample_image("alpha")
    multi = images.multi_platform_image("multi", [Platform("linux", "amd64"), Platform("linux", "arm64")])
    catalog = Catalog(
        alpha=alpha,
        beta=images.sample_image("beta", layer_count=3),
        multi=multi,
        doomed=images.sample_image("doomed"),
        signature=images.cosign_signature(
            "alpha", f"{registry.host}/{UPSTREAM_PATH}/alpha", alpha,
        ),
    )
    layout = Layout(workdir / "layout")
    for ref in ("alpha", "beta", "multi", "doomed", "signature"):
        layout.add(getattr(catalog, ref), ref)
    for tag in PAGINATED_TAGS:
        images.push(layout, "alpha", registry.host, f"{UPSTREAM_PATH}/alpha", tag)
    for ref in ("beta", "multi", "doomed"):
        images.push(layout, ref, registry.host, f"{UPSTREAM_PATH}/{ref}", "v1")
    # cosign keeps signatures beside the image, here in the separate registry.
    images.push(
        layout, "signature", signature_registry.host, f"{UPSTREAM_PATH}/alpha",
        images.signature_tag(alpha.digest),
    )
    for bucket in (BUCKET_REGION_ONE, BUCKET_REGION_TWO, BUCKET_DEFAULT):
        s3.create_bucket(bucket)
        _upload_blobs(s3, bucket, catalog.alpha, catalog)
    _upload_blobs(s3, BUCKET_REGION_ONE, catalog.multi, catalog)
    _upload_blobs(s3, BUCKET_REGION_ONE, catalog.doomed, catalog)
    return catalog


@pytest.fixture(scope="session", params=ENGINES)
def archeio(request: pytest.FixtureRequest, workdir: Path, registry: Registry, signature_registry: Registry,
            s3: S3Server, catalog: Catalog) -> Iterator[Archeio]:
    """`archeio serve` in front of the registries, once per HTTP engine: every pull test runs on both."""
    settings = {**archeio_settings(workdir, registry, signature_registry, s3), "ARCHEIO_HTTP": request.param}
    with services.archeio_server(workdir, settings, name=f"archeio-{request.param}") as running:
        yield running


@pytest.fixture(scope="session")
def proxy(workdir: Path, archeio: Archeio) -> Iterator[Proxy]:
    """nginx in front of archeio: one listener per simulated client location."""
    with services.nginx_proxy(workdir, archeio.url, CLIENTS) as running:
        yield running


@pytest.fixture(scope="session")
def places(registry: Registry, s3: S3Server) -> Places:
    return Places(registry, s3)


@pytest.fixture(scope="session")
def paging_upstreams(workdir: Path, registry: Registry, signature_registry: Registry,
                     catalog: Catalog) -> Iterator[tuple[Any, Any, tuple[Any, ...]]]:
    """Upstreams that page tag lists and referrers in twos, and the referrers they hold."""
    repository = f"{UPSTREAM_PATH}/{catalog.alpha.name}"
    artifacts = tuple(
        images.referrer(f"alpha-artifact-{i}", catalog.alpha, artifact_type)
        for i, artifact_type in enumerate(REFERRER_TYPES)
    )
    for artifact in artifacts:
        images.push_over_http(signature_registry.url, repository, artifact.digest, artifact)
    index = images.referrers_index(artifacts)
    images.push_over_http(signature_registry.url, repository, catalog.alpha.digest.replace(":", "-"), index)
    with (
        services.paging_registry(workdir, registry, "paging") as upstream,
        services.paging_registry(workdir, signature_registry, "paging-signatures") as signatures,
    ):
        yield upstream, signatures, artifacts


@pytest.fixture(scope="session", params=ENGINES)
def paged(request: pytest.FixtureRequest, workdir: Path, registry: Registry, signature_registry: Registry,
          s3: S3Server, paging_upstreams: tuple[Any, Any, tuple[Any, ...]]) -> Iterator[PagedWorld]:
    """An archeio, on each HTTP engine in turn, whose upstreams page in twos."""
    upstream, signatures, artifacts = paging_upstreams
    settings = archeio_settings(
        workdir, registry, signature_registry, s3,
        UPSTREAM_REGISTRY_ENDPOINT=upstream.url, SIGNATURE_UPSTREAM_ENDPOINT=signatures.url,
        ARCHEIO_HTTP=request.param,
    )
    with services.archeio_server(workdir, settings, name=f"archeio-paged-{request.param}") as archeio:
        yield PagedWorld(archeio, upstream, signatures, artifacts)
