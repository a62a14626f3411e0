"""Parsers for the cloud providers' published IP range files.

Each parser turns one provider's document into a `ProviderRanges`: the
provider's prefixes with the region each one belongs to, plus the
provider's own serial (creation date or change number) so that a reload can
refuse data older than what it already has.

Only the facts the router needs are kept: prefix, cloud, region. Services
are dropped because two entries for the same prefix (AWS lists `AMAZON` and
`EC2` for one range) always carry the same region.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

AWS = "AWS"
GCP = "GCP"
AZURE = "Azure"

# The file names `ARCHEIO_RANGES_DIR` holds, as the providers publish them.
FILE_NAMES = {
    AWS: "aws-ip-ranges.json",
    GCP: "gcp-cloud.json",
    AZURE: "azure-service-tags.json",
}


class RangeFileError(ValueError):
    """A range document that cannot be used (not JSON, wrong shape)."""


class CompiledPrefixes(Sequence[tuple[str, str]]):
    """`(prefix, region)` pairs kept as the compiled embedded data holds them.

    region -> (IPv4 prefixes, IPv6 prefixes), each joined by spaces: `CloudIndex` inserts them as they
    are, without a string operation per prefix, which is most of a start's
    index build. The pairs themselves are made only when someone iterates.
    """

    __slots__ = ("regions", "count")

    def __init__(self, regions: dict[str, list[str]], count: int) -> None:
        self.regions = regions
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for region, (v4, v6) in self.regions.items():
            for prefix in v4.split():
                yield prefix, region
            for prefix in v6.split():
                yield prefix, region

    def __getitem__(self, index: Any) -> Any:
        return tuple(self)[index]


@dataclass(frozen=True)
class ProviderRanges:
    """One provider's prefixes: `(prefix, region)` pairs and its serial."""

    cloud: str
    prefixes: Sequence[tuple[str, str]]
    # Comparable serial of the document: AWS createDate, Google
    # creationTime, Azure changeNumber (as a zero-padded string).
    serial: str
    # Human-readable date of the data, for start-up logs and `iprange`.
    date: str
    # True when every prefix is known to be a valid network, listed once,
    # and the pairs come as `CompiledPrefixes` (the compiled embedded data):
    # CloudIndex then skips its checks, which are most of its build time.
    checked: bool = False


def _require(doc: Any, key: str, kind: type, what: str) -> Any:
    if not isinstance(doc, dict) or not isinstance(doc.get(key), kind):
        raise RangeFileError(f"{what}: missing or malformed {key!r}")
    return doc[key]


def parse_aws(doc: Any) -> ProviderRanges:
    """AWS ip-ranges.json: `prefixes[].ip_prefix`, `ipv6_prefixes[].ipv6_prefix`."""
    created = _require(doc, "createDate", str, "AWS ranges")
    pairs: list[tuple[str, str]] = []
    for key, field in (("prefixes", "ip_prefix"), ("ipv6_prefixes", "ipv6_prefix")):
        for entry in _require(doc, key, list, "AWS ranges"):
            prefix, region = entry.get(field), entry.get("region")
            if not isinstance(prefix, str) or not isinstance(region, str):
                raise RangeFileError(f"AWS ranges: malformed entry in {key}: {entry!r}")
            pairs.append((prefix, region))
    return ProviderRanges(AWS, tuple(pairs), created, created)


def parse_gcp(doc: Any) -> ProviderRanges:
    """Google Cloud cloud.json: `prefixes[].ipv4Prefix|ipv6Prefix` with `scope`."""
    created = _require(doc, "creationTime", str, "Google Cloud ranges")
    pairs: list[tuple[str, str]] = []
    for entry in _require(doc, "prefixes", list, "Google Cloud ranges"):
        prefix = entry.get("ipv4Prefix") or entry.get("ipv6Prefix")
        scope = entry.get("scope")
        if not isinstance(prefix, str) or not isinstance(scope, str):
            raise RangeFileError(f"Google Cloud ranges: malformed entry: {entry!r}")
        pairs.append((prefix, scope))
    return ProviderRanges(GCP, tuple(pairs), created, created)


def parse_azure(doc: Any) -> ProviderRanges:
    """Azure Service Tags: only `AzureCloud.<region>` tags carry a region."""
    change = _require(doc, "changeNumber", int, "Azure service tags")
    pairs: list[tuple[str, str]] = []
    for tag in _require(doc, "values", list, "Azure service tags"):
        name = tag.get("name") if isinstance(tag, dict) else None
        if not isinstance(name, str) or not name.startswith("AzureCloud."):
            continue
        props = tag.get("properties") or {}
        region = props.get("region") or name.split(".", 1)[1]
        prefixes = props.get("addressPrefixes")
        if not isinstance(prefixes, list):
            raise RangeFileError(f"Azure service tags: {name} has no addressPrefixes")
        pairs.extend((p, region) for p in prefixes if isinstance(p, str))
    return ProviderRanges(AZURE, tuple(pairs), f"{change:012d}", f"changeNumber {change}")


PARSERS = {AWS: parse_aws, GCP: parse_gcp, AZURE: parse_azure}


def parse_file(cloud: str, path: Path) -> ProviderRanges:
    """Read and parse one provider's file; any failure is a `RangeFileError`."""
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise RangeFileError(f"{path}: {exc}") from exc
    return PARSERS[cloud](doc)
