"""Where blobs were served from, read from the registry's and the S3 server's own logs.

A "place" is `"registry"` or a bucket name. Marks are positions in the two
request logs, so a test sees only the requests made after its mark even
though the servers are shared by the whole session.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from .services import Registry, S3Server

REGISTRY = "registry"

Mark = tuple[int, int]


@dataclass
class Places:
    """The source registry and the S3 server, seen through their request logs."""

    registry: Registry
    s3: S3Server

    def mark(self) -> Mark:
        return self.registry.log.mark(), self.s3.log.mark()

    def blob_requests_since(self, mark: Mark, digest: str, method: str) -> Counter[str]:
        """Requests with `method` for blob `digest` after `mark`, counted by place."""
        registry_mark, s3_mark = mark
        counts: Counter[str] = Counter()
        for request in self.registry.log.since(registry_mark):
            if request.method == method and request.path.endswith(f"/blobs/{digest}"):
                counts[REGISTRY] += 1
        for request in self.s3.log.since(s3_mark):
            bucket, _, key = request.path.lstrip("/").partition("/")
            if request.method == method and key == f"containers/images/{digest}":
                counts[bucket] += 1
        return counts

    def blob_gets_since(self, mark: Mark, digest: str) -> Counter[str]:
        return self.blob_requests_since(mark, digest, "GET")
