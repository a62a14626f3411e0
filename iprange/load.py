"""Where the router's range data comes from: a directory, or the embedded default.

With a directory, exactly the provider files present are loaded and nothing
embedded is mixed in: a provider without a file is simply unknown. This is
what `ARCHEIO_RANGES_DIR` and `iprange --ranges-dir` mean.
"""

from __future__ import annotations

from pathlib import Path

from .embedded import load_embedded
from .index import CloudIndex
from .parse import FILE_NAMES, ProviderRanges, RangeFileError, parse_file


def read_dir(ranges_dir: Path) -> list[ProviderRanges]:
    """Parse every known provider file present in `ranges_dir`."""
    if not ranges_dir.is_dir():
        raise RangeFileError(f"{ranges_dir}: not a directory")
    return [
        parse_file(cloud, ranges_dir / name)
        for cloud, name in FILE_NAMES.items()
        if (ranges_dir / name).exists()
    ]


def load_index(ranges_dir: Path | None) -> CloudIndex:
    """Build the index from `ranges_dir`, or from the embedded data when None."""
    providers = read_dir(ranges_dir) if ranges_dir is not None else load_embedded()
    return CloudIndex(providers)


def describe(index: CloudIndex) -> str:
    """One line naming each provider's prefix count and data date."""
    if not index.providers:
        return "no providers"
    return "; ".join(
        f"{cloud}: {index.prefix_counts[cloud]} prefixes, {p.date}"
        for cloud, p in index.providers.items()
    )
