"""Download the providers' range feeds into a directory, validated, atomically.

`iprange update --dest DIR` fetches the AWS and Google Cloud feeds (and
Azure's, whose address changes every week, only when its URL is given),
checks each one as the server would load it, and replaces the file in DIR
with a rename, so a reader (the server reloading on SIGHUP or its timer)
sees the old file or the new one, never a partial one. A feed that cannot be
downloaded, does not parse, is older than the file already in DIR or drops
more than `max_loss` of its prefixes leaves that file as it was.

Downloading is kept out of the server on purpose: the server never needs
outbound internet access, and the updater can run as a cron job, a sidecar
or a build step.
"""

from __future__ import annotations

import json
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .index import CloudIndex
from .judge import LOSS, NEWER, OLDER, SAME, check_prefixes, compare, distinct_prefixes  # noqa: F401
from .parse import AWS, FILE_NAMES, GCP, PARSERS, ProviderRanges, RangeFileError, parse_file

# The official feeds. Azure has none that stays put: Microsoft publishes its Service Tags
# (ServiceTags_Public_YYYYMMDD.json) at a new download-center address every week.
DEFAULT_URLS = {
    AWS: "https://ip-ranges.amazonaws.com/ip-ranges.json",
    GCP: "https://www.gstatic.com/ipranges/cloud.json",
}

# Larger than any real feed (Azure's, the largest, is ~5 MB); guards the disk.
MAX_FEED_BYTES = 64 * 1024 * 1024

@dataclass(frozen=True)
class Result:
    """What happened to one provider's file."""

    cloud: str
    path: Path
    ok: bool
    message: str


def validate(cloud: str, body: bytes) -> ProviderRanges:
    """Parse a downloaded feed as the server would; RangeFileError if unusable."""
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise RangeFileError(f"not JSON: {exc}") from None
    provider = PARSERS[cloud](doc)
    if not provider.prefixes:
        raise RangeFileError("no prefixes")
    check_prefixes(provider)
    try:
        CloudIndex([provider])
    except (ValueError, SystemError) as exc:
        raise RangeFileError(str(exc)) from None
    return provider


def download(url: str, timeout: float) -> bytes:
    """The body of `url`; OSError (URLError included) when it cannot be fetched."""
    request = urllib.request.Request(url, headers={"User-Agent": "archeio-iprange-update"})
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - http(s) only
        body: bytes = response.read(MAX_FEED_BYTES + 1)
    if len(body) > MAX_FEED_BYTES:
        raise OSError(f"larger than {MAX_FEED_BYTES} bytes")
    return body


def write_atomically(path: Path, body: bytes) -> None:
    """Write to a temporary file beside `path`, flush it to disk, rename it over `path`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(body)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def update_provider(cloud: str, url: str, dest: Path, timeout: float, max_loss: float) -> Result:
    """Fetch, validate and install one provider's feed; the old file stays on any failure."""
    path = dest / FILE_NAMES[cloud]
    kept = f"kept {path}" if path.exists() else "no file written"
    if not url.startswith(("http://", "https://")):
        return Result(cloud, path, False, f"{url!r} is not an http(s) URL; {kept}")
    try:
        body = download(url, timeout)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return Result(cloud, path, False, f"cannot download {url}: {reason}; {kept}")
    try:
        candidate = validate(cloud, body)
    except RangeFileError as exc:
        return Result(cloud, path, False, f"{url} is not a usable {cloud} feed: {exc}; {kept}")
    if path.exists():
        try:
            loaded = parse_file(cloud, path)
        except RangeFileError:
            loaded = None  # a broken file there is replaced by a good one
        if loaded is not None:
            outcome, reason = compare(loaded, candidate, max_loss)
            if outcome == SAME:
                return Result(cloud, path, True, f"{path}: {reason}")
            if outcome != NEWER:
                return Result(cloud, path, False, f"refused {url}: {reason}; {kept}")
    write_atomically(path, body)
    return Result(cloud, path, True, f"wrote {path}: {len(candidate.prefixes)} entries, {candidate.date}")


def update(dest: Path, urls: dict[str, str], timeout: float = 30.0, max_loss: float = 0.2) -> list[Result]:
    """Update every provider in `urls` (cloud -> feed URL) inside `dest`."""
    return [update_provider(cloud, url, dest, timeout, max_loss) for cloud, url in urls.items()]
