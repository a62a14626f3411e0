"""Fixtures of the integration suite: real servers and real images, once per session.

The session starts two docker-registries (the source registry and a
separate signature registry), one moto S3 server holding three buckets
(two regional mirrors and the default "CDN" mirror), pushes the images of
`Catalog` with skopeo, copies the blobs of some of them into the buckets,
then starts `archeio serve` and an nginx with one listener per simulated
client. Everything is stopped by PID when the session ends.

A missing program fails the tests with a message naming the package to
install; these tests never skip.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from . import images, services
from .images import Image, Layout, Platform
from .places import Places
from .services import Archeio, MissingTool, Proxy, Registry, S3Server

UPSTREAM_PATH = "integration/images"

# Simulated clients: name -> the address the load balancer reports. Real
# addresses from the providers' published ranges (see `iprange lookup`);
# they are only ever header values, never traffic targets.
CLIENTS = {
    "aws_region_one": "35.180.1.1",  # AWS eu-west-3
    "aws_region_two": "43.206.1.1",  # AWS ap-northeast-1
    "google_cloud": "35.220.26.1",  # Google Cloud europe-north1
    "unknown": "192.168.0.1",  # in no provider's range
}
REGION_ONE = "eu-west-3"
REGION_TWO = "ap-northeast-1"

# Buckets, and the simulated client whose blobs each one should serve.
BUCKET_REGION_ONE = "mirror-eu-west-3"
BUCKET_REGION_TWO = "mirror-ap-northeast-1"
BUCKET_DEFAULT = "mirror-default"
BUCKET_OF_CLIENT = {
    "aws_region_one": BUCKET_REGION_ONE,
    "aws_region_two": BUCKET_REGION_TWO,
    "unknown": BUCKET_DEFAULT,
    "google_cloud": None,  # always the source registry
}

PAGINATED_TAGS = ("v1", "v2", "v3", "v4", "v5")


@dataclass
class Catalog:
    """The images pushed upstream and which bucket holds whose blobs."""

    alpha: Image  # single platform; blobs in every bucket; signed; tags PAGINATED_TAGS
    beta: Image  # single platform; blobs in no bucket: always the registry
    multi: Image  # two-platform index; blobs in region one's bucket only
    doomed: Image  # blobs in region one's bucket, deleted from it by a test
    signature: Image  # cosign signature of alpha, only in the signature registry
    buckets: dict[str, set[str]] = field(default_factory=dict)  # bucket -> digests held

    def repository(self, image: Image) -> str:
        """The name clients pull (archeio adds UPSTREAM_PATH in front)."""
        return image.name

    def bucket_holds(self, bucket: str | None, digest: str) -> bool:
        return bucket is not None and digest in self.buckets.get(bucket, set())


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


def archeio_settings(workdir: Path, registry: Registry, signature_registry: Registry, s3: S3Server,
                     **extra: str) -> dict[str, str]:
    """The environment of an archeio wired to the suite's registries and buckets."""
    mirrors = services.write_mirrors_file(workdir / "mirrors.toml", {
        "AWS": {
            REGION_ONE: s3.bucket_url(BUCKET_REGION_ONE),
            REGION_TWO: s3.bucket_url(BUCKET_REGION_TWO),
        },
    })
    return {
        "UPSTREAM_REGISTRY_ENDPOINT": registry.url,
        "UPSTREAM_REGISTRY_PATH": UPSTREAM_PATH,
        "SIGNATURE_UPSTREAM_ENDPOINT": signature_registry.url,
        # Never the real CDN: unknown clients' blobs are checked in a local bucket.
        "DEFAULT_AWS_BASE_URL": s3.bucket_url(BUCKET_DEFAULT),
        "ARCHEIO_MIRRORS_FILE": str(mirrors),
        **extra,
    }


@pytest.fixture(scope="session")
def archeio(workdir: Path, registry: Registry, signature_registry: Registry, s3: S3Server,
            catalog: Catalog) -> Iterator[Archeio]:
    settings = archeio_settings(workdir, registry, signature_registry, s3)
    with services.archeio_server(workdir, settings) as running:
        yield running


@pytest.fixture(scope="session")
def proxy(workdir: Path, archeio: Archeio) -> Iterator[Proxy]:
    """nginx in front of archeio: one listener per simulated client location."""
    with services.nginx_proxy(workdir, archeio.url, CLIENTS) as running:
        yield running


@pytest.fixture(scope="session")
def places(registry: Registry, s3: S3Server) -> Places:
    return Places(registry, s3)
