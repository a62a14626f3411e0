"""Which providers' range data a deployment cannot serve without.

The router tells clients apart by the range data: Google Cloud's clients
get every blob from upstream (same cloud, no egress), and a client in a
cloud of the mirror table gets its region's mirror. Without a provider's
ranges its clients are "unknown" and their blobs go to the CDN: it still
answers, but it costs egress, and nothing would say so. So a deployment
*requires* Google Cloud's ranges and those of every cloud that the mirror
table (`ARCHEIO_MIRRORS_FILE`, or the built-in AWS table) gives a mirror,
minus the providers `ARCHEIO_OPTIONAL_PROVIDERS` lets be absent, and a
start without one of them refuses (exit 2). A reload never drops one
either (reload.py).

The *expected* providers are Google Cloud and the mirror table's clouds,
optional or not: `archeio_ranges_prefixes` is exported for each of them,
0 when absent, so that an alert can fire.

Pure functions of the settings and of which providers have data, shared
by the serving process (which knows the prefix counts) and the supervisor
of workers (which only looks at which files are there, so that it starts
no worker it knows will fail).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from iprange.parse import FILE_NAMES, GCP

from .config import Settings


def expected_providers(settings: Settings) -> tuple[str, ...]:
    """Google Cloud and every cloud the mirror table gives a mirror, in the range files' order."""
    wanted = {GCP} | {cloud for cloud, regions in settings.mirrors.by_cloud.items() if regions}
    return tuple(cloud for cloud in FILE_NAMES if cloud in wanted)


def required_providers(settings: Settings) -> tuple[str, ...]:
    """The expected providers that `ARCHEIO_OPTIONAL_PROVIDERS` does not let be absent."""
    return tuple(cloud for cloud in expected_providers(settings) if cloud not in settings.optional_providers)


def _source(settings: Settings) -> str:
    return str(settings.ranges_dir) if settings.ranges_dir else "the embedded range data"


def missing_providers(settings: Settings, present: Iterable[str]) -> str | None:
    """Why the range data cannot be served (one line naming its directory), or None if it can.

    `present`: the providers that have data (at least one prefix, or a file
    where only file names are looked at).
    """
    have = set(present)
    if not have:
        names = ", ".join(FILE_NAMES.values())
        return f"{_source(settings)}: no provider's ranges (none of {names})"
    missing = [cloud for cloud in required_providers(settings) if cloud not in have]
    if not missing:
        return None
    files = ", ".join(f"{cloud} ({FILE_NAMES[cloud]})" for cloud in missing)
    return (
        f"{_source(settings)}: no ranges for {files}, required (Google Cloud, and every cloud of the "
        "mirror table); ARCHEIO_OPTIONAL_PROVIDERS lists the providers that may be absent"
    )


def with_prefixes(prefix_counts: Mapping[str, int]) -> list[str]:
    """The providers of a range index that have at least one prefix."""
    return [cloud for cloud, count in prefix_counts.items() if count > 0]


def files_present(ranges_dir: Path) -> list[str]:
    """The providers whose file is in `ranges_dir` (not parsed: the supervisor's cheap look)."""
    return [cloud for cloud, name in FILE_NAMES.items() if (ranges_dir / name).is_file()]
