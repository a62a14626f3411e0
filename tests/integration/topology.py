"""The simulated world of the integration suite: clients, regions, buckets, images.

Which client sits where, which bucket mirrors which region, and which
bucket holds whose blobs. The fixtures build it; the tests read their
expectations from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import services
from .images import Image
from .services import Registry, S3Server

UPSTREAM_PATH = "integration/images"

# Simulated clients: name -> the address the load balancer reports. Real
# addresses from the providers' published ranges (see `iprange lookup`);
# they are only ever header values, never traffic targets.
CLIENTS = {
    "aws_region_one": "35.180.1.1",  # AWS eu-west-3
    "aws_region_two": "43.206.1.1",  # AWS ap-northeast-1
    "aws_unmirrored_region": "54.148.0.1",  # AWS us-west-2: no mirror in our table
    "google_cloud": "35.220.26.1",  # Google Cloud europe-north1
    "unknown": "192.168.0.1",  # in no provider's range
}
REGION_ONE = "eu-west-3"
REGION_TWO = "ap-northeast-1"

# Buckets, and which one must serve each client (when it holds the blob):
# a region's own mirror, else the default one (upstream's CDN); Google Cloud
# clients always get the source registry.
BUCKET_REGION_ONE = "mirror-eu-west-3"
BUCKET_REGION_TWO = "mirror-ap-northeast-1"
BUCKET_DEFAULT = "mirror-default"
BUCKET_OF_CLIENT = {
    "aws_region_one": BUCKET_REGION_ONE,
    "aws_region_two": BUCKET_REGION_TWO,
    "aws_unmirrored_region": BUCKET_DEFAULT,
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

    def bucket_holds(self, bucket: str | None, digest: str) -> bool:
        return bucket is not None and digest in self.buckets.get(bucket, set())


def archeio_settings(
    workdir: Path, registry: Registry, signature_registry: Registry, s3: S3Server, **extra: str,
) -> dict[str, str]:
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


# Artifacts referring to alpha (the referrers API), in the signature registry:
# five, so that pages of two need three requests.
REFERRER_TYPES = ("application/vnd.example.sbom.v1", "application/vnd.example.sbom.v1",
                  "application/vnd.example.provenance.v1", "application/vnd.example.sbom.v1",
                  "application/vnd.example.vex.v1")


@dataclass
class PagedWorld:
    """An archeio whose upstreams page: each a paginating front of a real registry."""

    archeio: services.Archeio
    upstream: services.PagingRegistry  # in front of the source registry
    signatures: services.PagingRegistry  # in front of the signature registry
    referrers: tuple[Image, ...]  # the artifacts referring to alpha
