"""Mirror destinations: from the base URLs `archeio serve` uses to S3 buckets."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from archeio.mirror.cli import _destinations, add_arguments
from archeio.mirror.s3 import Bucket, DestinationError, bucket_from_url

DIGEST = "sha256:" + "d" * 64


@pytest.mark.parametrize("url, endpoint, expected", [
    # path style, as the mirrors file of a local S3-compatible store has it
    ("http://127.0.0.1:9000/blobs", None,
     Bucket("http://127.0.0.1:9000/blobs", "blobs", "", "http://127.0.0.1:9000", None, "path")),
    ("http://127.0.0.1:9000/blobs/", None,
     Bucket("http://127.0.0.1:9000/blobs", "blobs", "", "http://127.0.0.1:9000", None, "path")),
    ("http://127.0.0.1:9000/blobs/some/prefix", None,
     Bucket("http://127.0.0.1:9000/blobs/some/prefix", "blobs", "some/prefix/", "http://127.0.0.1:9000",
            None, "path")),
    ("https://s3.eu-west-3.amazonaws.com/my-bucket", None,
     Bucket("https://s3.eu-west-3.amazonaws.com/my-bucket", "my-bucket", "", "https://s3.eu-west-3.amazonaws.com",
            None, "path")),
    # virtual-hosted AWS, as upstream's table has it
    ("https://prod-registry-k8s-io-eu-west-3.s3.dualstack.eu-west-3.amazonaws.com", None,
     Bucket("https://prod-registry-k8s-io-eu-west-3.s3.dualstack.eu-west-3.amazonaws.com",
            "prod-registry-k8s-io-eu-west-3", "", None, "eu-west-3", "virtual")),
    ("https://my.bucket.s3.us-west-2.amazonaws.com", None,
     Bucket("https://my.bucket.s3.us-west-2.amazonaws.com", "my.bucket", "", None, "us-west-2", "virtual")),
    ("https://old-style.s3-ap-southeast-2.amazonaws.com", None,
     Bucket("https://old-style.s3-ap-southeast-2.amazonaws.com", "old-style", "", None, "ap-southeast-2",
            "virtual")),
    ("https://global.s3.amazonaws.com", None,
     Bucket("https://global.s3.amazonaws.com", "global", "", None, "us-east-1", "virtual")),
    # virtual-hosted on an S3-compatible store given by its endpoint
    ("https://blobs.store.example", "https://store.example",
     Bucket("https://blobs.store.example", "blobs", "", "https://store.example", None, "virtual")),
])
def test_bucket_from_url(url: str, endpoint: str | None, expected: Bucket) -> None:
    assert bucket_from_url(url, endpoint) == expected


@pytest.mark.parametrize("url", [
    "https://d1be1w964nk82h.cloudfront.net",  # a CDN: no bucket in the URL
    "ftp://127.0.0.1/bucket",
    "http://127.0.0.1:9000/Not_A_Bucket",
    "http:///bucket",
])
def test_urls_without_a_bucket_are_refused_with_a_reason(url: str) -> None:
    with pytest.raises(DestinationError, match=r"\S"):
        bucket_from_url(url)


def test_region_signs_only_where_the_url_names_none() -> None:
    assert bucket_from_url("http://127.0.0.1:9000/b-1", region="eu-west-3").region == "eu-west-3"
    aws = "https://x-bucket.s3.ap-east-1.amazonaws.com"
    assert bucket_from_url(aws, region="ap-east-2").region == "ap-east-1"


def test_keys_are_where_archeio_serve_looks() -> None:
    bucket = bucket_from_url("http://127.0.0.1:9000/blobs/pre")
    assert bucket.blob_key(DIGEST) == f"pre/containers/images/{DIGEST}"
    assert bucket.done_key("team/app", DIGEST) == f"pre/archeio-mirror/done/team/app@{DIGEST}"


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--source", "http://127.0.0.1:5000", "team/app", *argv])


def test_destinations_from_the_mirrors_file_once_per_url(tmp_path: Path) -> None:
    mirrors = tmp_path / "mirrors.toml"
    mirrors.write_text(
        "[mirrors.AWS]\n"
        '"eu-west-3" = "http://127.0.0.1:9000/eu-bucket"\n'
        '"ap-east-1" = "https://hk-bucket.s3.dualstack.ap-east-1.amazonaws.com"\n'
        '"ap-east-2" = "https://hk-bucket.s3.dualstack.ap-east-1.amazonaws.com"\n'
    )
    buckets = _destinations(parse("--mirrors-file", str(mirrors)))
    assert [(b.name, b.region) for b in buckets] == [("eu-bucket", "eu-west-3"), ("hk-bucket", "ap-east-1")]
    only = _destinations(parse("--mirrors-file", str(mirrors), "--region", "eu-west-3"))
    assert [b.name for b in only] == ["eu-bucket"]


def test_unknown_region_filter_is_an_error(tmp_path: Path) -> None:
    mirrors = tmp_path / "mirrors.toml"
    mirrors.write_text('[mirrors.AWS]\n"eu-west-3" = "http://127.0.0.1:9000/eu-bucket"\n')
    with pytest.raises(ValueError, match="us-east-9"):
        _destinations(parse("--mirrors-file", str(mirrors), "--region", "us-east-9"))


def test_explicit_list_and_no_destination(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ARCHEIO_MIRRORS_FILE", raising=False)
    buckets = _destinations(parse("--to", "http://127.0.0.1:9000/a-1", "--to", "http://127.0.0.1:9000/a-2/"))
    assert [b.name for b in buckets] == ["a-1", "a-2"]
    with pytest.raises(ValueError, match="no destination"):
        _destinations(parse())
