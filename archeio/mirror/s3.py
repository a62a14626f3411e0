"""The write side of the mirror: S3-compatible buckets, through boto3.

A destination is given as the base URL `archeio serve` uses for it (the
`ARCHEIO_MIRRORS_FILE` values); `bucket_from_url` derives the bucket, the
endpoint and the key prefix from it:

- path style, `http://127.0.0.1:9000/bucket[/prefix]`: endpoint
  `http://127.0.0.1:9000` (or the one given), bucket `bucket`;
- virtual-hosted AWS, `https://bucket.s3[.dualstack].<region>.amazonaws.com`:
  the AWS endpoint of that region, bucket `bucket`;
- virtual-hosted on a given endpoint, `https://bucket.store.example` with
  endpoint `https://store.example`.

Blobs go to `<prefix>containers/images/<digest>`, where the server HEADs
them, readable by anyone (`public-read`) and typed
`application/octet-stream`. Finished images are recorded as small objects
under `<prefix>archeio-mirror/done/`, outside the key space clients read.

boto3 is synchronous; `BucketStore` methods are called from worker threads
by the copier. Nothing here decides what to copy.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger("archeio.mirror")

BLOB_PREFIX = "containers/images/"
DONE_PREFIX = "archeio-mirror/done/"
CONTENT_TYPE = "application/octet-stream"

# bucket.s3.amazonaws.com, bucket.s3.<region>.amazonaws.com,
# bucket.s3.dualstack.<region>.amazonaws.com, bucket.s3-<region>.amazonaws.com
_AWS_VIRTUAL_HOST = re.compile(
    r"^(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])\.s3"
    r"(?:[.-](?:dualstack\.)?(?P<region>[a-z]{2}(?:-[a-z]+)+-\d))?\.amazonaws\.com(?:\.cn)?$"
)
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class DestinationError(ValueError):
    """A destination URL we cannot turn into a bucket."""


@dataclass(frozen=True)
class Bucket:
    """Where one mirror's blobs live, as S3 sees it."""

    base_url: str  # as `archeio serve` has it
    name: str
    prefix: str = ""  # "" or "some/path/"
    endpoint_url: str | None = None  # None: AWS, from the region
    region: str | None = None  # None: the AWS configuration chain decides
    addressing_style: str = "path"  # "path" or "virtual"

    def blob_key(self, digest: str) -> str:
        return f"{self.prefix}{BLOB_PREFIX}{digest}"

    def done_key(self, repository: str, digest: str) -> str:
        return f"{self.prefix}{DONE_PREFIX}{repository}@{digest}"

    def __str__(self) -> str:
        return self.base_url


def bucket_from_url(url: str, endpoint_url: str | None = None, region: str | None = None) -> Bucket:
    """The bucket behind a mirror base URL (see the module docstring).

    `region` signs requests when the URL does not name one itself.
    """
    parts = urlsplit(url.rstrip("/"))
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or not host:
        raise DestinationError(f"{url!r}: not an http(s) URL")
    segments = [s for s in parts.path.split("/") if s]
    aws = _AWS_VIRTUAL_HOST.match(host)
    if aws:
        return Bucket(
            url.rstrip("/"), aws.group("bucket"), _prefix(segments), endpoint_url,
            aws.group("region") or region or "us-east-1", "virtual",
        )
    if endpoint_url:
        endpoint_host = (urlsplit(endpoint_url).hostname or "").lower()
        if endpoint_host and host.endswith("." + endpoint_host):
            name = host[: -len(endpoint_host) - 1]
            return Bucket(url.rstrip("/"), _bucket_name(name, url), _prefix(segments),
                          endpoint_url, region, "virtual")
    if not segments:
        raise DestinationError(
            f"{url!r}: cannot tell the bucket (use http://host/bucket, "
            "https://bucket.s3.<region>.amazonaws.com, or --s3-endpoint for a virtual-hosted store)"
        )
    derived_endpoint = endpoint_url or f"{parts.scheme}://{parts.netloc}"
    return Bucket(url.rstrip("/"), _bucket_name(segments[0], url), _prefix(segments[1:]),
                  derived_endpoint, region, "path")


def _bucket_name(name: str, url: str) -> str:
    if not _BUCKET_NAME.match(name):
        raise DestinationError(f"{url!r}: {name!r} is not a valid bucket name")
    return name


def _prefix(segments: Sequence[str]) -> str:
    return "".join(f"{s}/" for s in segments)


def sha256_base64(raw_digest: bytes) -> str:
    """The form S3's `ChecksumSHA256` takes."""
    return base64.b64encode(raw_digest).decode("ascii")


class BucketStore:
    """The S3 calls the mirror makes on one bucket (blocking; call from threads)."""

    def __init__(self, bucket: Bucket, client: Any, *, acl: str | None = "public-read",
                 checksums: bool = True) -> None:
        self.bucket = bucket
        self.acl = acl
        # Cleared when the store refuses checksums (some S3-compatible stores do).
        self.checksums = checksums
        # Multipart uploads begun with a checksum algorithm need one on every part.
        self._checksummed_uploads: set[str] = set()
        self._client = client

    # -- reads -----------------------------------------------------------------

    def blob_size(self, digest: str) -> int | None:
        """Size of the stored blob, or None when it is not there."""
        from botocore.exceptions import ClientError

        try:
            head = self._client.head_object(Bucket=self.bucket.name, Key=self.bucket.blob_key(digest))
        except ClientError as exc:
            # 403 is what S3 says for a missing key without s3:ListBucket;
            # the upload that follows will tell if we really lack access.
            if _status(exc) in (403, 404):
                return None
            raise
        return int(head["ContentLength"])

    def done_markers(self) -> set[str]:
        """`repository@digest` of every image recorded as finished in this bucket."""
        paginator = self._client.get_paginator("list_objects_v2")
        prefix = self.bucket.prefix + DONE_PREFIX
        done: set[str] = set()
        for page in paginator.paginate(Bucket=self.bucket.name, Prefix=prefix):
            for item in page.get("Contents", ()):
                done.add(item["Key"][len(prefix):])
        return done

    # -- writes ----------------------------------------------------------------

    def put_blob(self, digest: str, body: bytes, sha256: bytes | None) -> None:
        """One-request upload of a whole, already verified blob."""
        args = self._object_args(self.bucket.blob_key(digest))
        if self.checksums and sha256 is not None:
            args.update(ChecksumAlgorithm="SHA256", ChecksumSHA256=sha256_base64(sha256))
        self._call_with_checksum_fallback("put_object", args, Body=body)

    def start_upload(self, digest: str) -> str:
        """Begin a multipart upload: invisible until `complete_upload`."""
        args = self._object_args(self.bucket.blob_key(digest))
        if self.checksums:
            args["ChecksumAlgorithm"] = "SHA256"
        answer = self._call_with_checksum_fallback("create_multipart_upload", args)
        upload_id = str(answer["UploadId"])
        if self.checksums:
            self._checksummed_uploads.add(upload_id)
        return upload_id

    def upload_part(self, digest: str, upload_id: str, number: int, body: bytes,
                    sha256: bytes) -> dict[str, Any]:
        args: dict[str, Any] = {
            "Bucket": self.bucket.name, "Key": self.bucket.blob_key(digest),
            "UploadId": upload_id, "PartNumber": number, "Body": body,
        }
        part: dict[str, Any] = {"PartNumber": number}
        if upload_id in self._checksummed_uploads:
            args["ChecksumSHA256"] = part["ChecksumSHA256"] = sha256_base64(sha256)
        part["ETag"] = self._client.upload_part(**args)["ETag"]
        return part

    def complete_upload(self, digest: str, upload_id: str, parts: list[dict[str, Any]]) -> None:
        self._checksummed_uploads.discard(upload_id)
        self._client.complete_multipart_upload(
            Bucket=self.bucket.name, Key=self.bucket.blob_key(digest), UploadId=upload_id,
            MultipartUpload={"Parts": parts},
        )

    def abort_upload(self, digest: str, upload_id: str) -> None:
        self._checksummed_uploads.discard(upload_id)
        self._client.abort_multipart_upload(
            Bucket=self.bucket.name, Key=self.bucket.blob_key(digest), UploadId=upload_id
        )

    def mark_done(self, repository: str, digest: str, record: dict[str, Any]) -> None:
        """Record a finished image: every blob of it is in this bucket."""
        self._client.put_object(
            Bucket=self.bucket.name, Key=self.bucket.done_key(repository, digest),
            Body=json.dumps(record, sort_keys=True).encode(), ContentType="application/json",
        )

    # -- plumbing ----------------------------------------------------------------

    def _object_args(self, key: str) -> dict[str, Any]:
        args: dict[str, Any] = {"Bucket": self.bucket.name, "Key": key, "ContentType": CONTENT_TYPE}
        if self.acl:
            args["ACL"] = self.acl
        return args

    def _call_with_checksum_fallback(self, operation: str, args: dict[str, Any], **extra: Any) -> Any:
        """Call; if the store rejects the checksum arguments, drop them for good and call again."""
        from botocore.exceptions import ClientError

        call = getattr(self._client, operation)
        try:
            return call(**args, **extra)
        except ClientError as exc:
            if "ChecksumAlgorithm" not in args or not _rejects_checksums(exc):
                raise
        log.warning("%s does not take SHA-256 checksums; uploading without them", self.bucket)
        self.checksums = False
        args = {k: v for k, v in args.items() if not k.startswith("Checksum")}
        return call(**args, **extra)


def _status(exc: Any) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _rejects_checksums(exc: Any) -> bool:
    error = exc.response.get("Error", {})
    code, message = str(error.get("Code", "")), str(error.get("Message", ""))
    return code in ("NotImplemented", "InvalidArgument", "InvalidRequest") and "checksum" in message.lower()


def make_clients(buckets: Sequence[Bucket], max_connections: int = 10) -> list[Any]:
    """One boto3 S3 client per bucket; credentials from the standard AWS chain.

    They share one boto3 session: building the first client loads the
    service model, the others reuse it.
    """
    import boto3
    from botocore.config import Config

    session = boto3.session.Session()
    clients = []
    for bucket in buckets:
        config = Config(
            region_name=bucket.region,
            max_pool_connections=max_connections,
            retries={"mode": "standard", "max_attempts": 5},
            s3={"addressing_style": bucket.addressing_style},
            # We send our own SHA-256 checksums; do not let botocore add
            # CRC32s that some S3-compatible stores reject.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        clients.append(session.client("s3", endpoint_url=bucket.endpoint_url, config=config))
    return clients
