"""`iprange update`: feeds from a local HTTP server, validated, written atomically.

The feeds are the small files of tests/data/ranges, in the providers' own
formats, served by a real HTTP server on loopback; the command runs as a
user runs it.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread
from typing import Any

import pytest

from iprange.update import write_atomically

from .conftest import AWS_EU_WEST_3, AZURE_CANADACENTRAL, free_port
from .ops_support import azure_document, moved_region, range_documents

AWS_FILE, GCP_FILE, AZURE_FILE = "aws-ip-ranges.json", "gcp-cloud.json", "azure-service-tags.json"


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def feeds(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(base URL, served directory) of a loopback HTTP server publishing the feeds."""
    served = tmp_path / "published"
    served.mkdir()
    aws, gcp = range_documents()
    (served / "ip-ranges.json").write_text(json.dumps(aws))
    (served / "cloud.json").write_text(json.dumps(gcp))
    (served / "ServiceTags_Public.json").write_text(json.dumps(azure_document()))
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(served)))
    thread = Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", served
    finally:
        server.shutdown()
        server.server_close()


def iprange(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "iprange", *args], capture_output=True, text=True, timeout=60)


def update(dest: Path, base: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return iprange("update", "--dest", str(dest), "--aws-url", f"{base}/ip-ranges.json",
                   "--gcp-url", f"{base}/cloud.json", "--timeout", "10", *extra)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_update_writes_the_feeds_that_the_server_then_loads(tmp_path: Path, feeds: tuple[str, Path]) -> None:
    base, served = feeds
    dest = tmp_path / "ranges"
    dest.mkdir()
    result = update(dest, base)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in dest.iterdir()) == [AWS_FILE, GCP_FILE]  # no Azure, no temp files
    assert (dest / AWS_FILE).read_bytes() == (served / "ip-ranges.json").read_bytes()
    assert (dest / GCP_FILE).read_bytes() == (served / "cloud.json").read_bytes()
    lookup = iprange("--ranges-dir", str(dest), "lookup", AWS_EU_WEST_3)
    assert lookup.stdout.split() == [AWS_EU_WEST_3, "AWS", "eu-west-3"]


def test_azure_is_fetched_only_when_its_url_is_given(tmp_path: Path, feeds: tuple[str, Path]) -> None:
    base, _ = feeds
    dest = tmp_path / "ranges"
    dest.mkdir()
    result = update(dest, base, "--azure-url", f"{base}/ServiceTags_Public.json")
    assert result.returncode == 0, result.stderr
    assert (dest / AZURE_FILE).is_file()
    lookup = iprange("--ranges-dir", str(dest), "lookup", AZURE_CANADACENTRAL)
    assert lookup.stdout.split() == [AZURE_CANADACENTRAL, "Azure", "canadacentral"]


def test_offline_fails_clearly_and_keeps_the_old_files(tmp_path: Path, feeds: tuple[str, Path]) -> None:
    base, _ = feeds
    dest = tmp_path / "ranges"
    dest.mkdir()
    assert update(dest, base).returncode == 0
    before = snapshot(dest)
    offline = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = update(dest, offline)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2
    assert all("cannot download" in line and "kept" in line for line in lines), result.stderr
    assert snapshot(dest) == before


def _publish(served: Path, name: str, body: str) -> None:
    (served / name).write_text(body)


@pytest.mark.parametrize(
    ("feed", "message"),
    [
        ("not json at all", "not a usable AWS feed"),
        (json.dumps({"createDate": "2031-01-01-00-00-00", "prefixes": []}), "not a usable AWS feed"),
        (json.dumps({"createDate": "2031-01-01-00-00-00", "ipv6_prefixes": [],
                     "prefixes": [{"ip_prefix": "35.180.0.0/99", "region": "x"}]}), "bad prefix"),
        ("OLDER", "older than"),
        ("SHRUNK", "loses more than"),
    ],
)
def test_bad_feed_is_refused_and_the_old_file_kept(
    tmp_path: Path, feeds: tuple[str, Path], feed: str, message: str
) -> None:
    base, served = feeds
    dest = tmp_path / "ranges"
    dest.mkdir()
    assert update(dest, base).returncode == 0
    before = snapshot(dest)
    aws: dict[str, Any] = json.loads((served / "ip-ranges.json").read_text())
    if feed == "OLDER":
        feed = json.dumps(moved_region(aws, "eu-west-3", "eu-central-1", "2020-01-01-00-00-00"))
    elif feed == "SHRUNK":
        shrunk = dict(aws, createDate="2031-01-01-00-00-00", ipv6_prefixes=[])
        shrunk["prefixes"] = aws["prefixes"][:5]
        feed = json.dumps(shrunk)
    _publish(served, "ip-ranges.json", feed)
    result = update(dest, base)
    assert result.returncode == 1
    assert message in result.stderr and "kept" in result.stderr, result.stderr
    assert snapshot(dest) == before


def test_newer_feed_replaces_the_file(tmp_path: Path, feeds: tuple[str, Path]) -> None:
    base, served = feeds
    dest = tmp_path / "ranges"
    dest.mkdir()
    assert update(dest, base).returncode == 0
    aws = json.loads((served / "ip-ranges.json").read_text())
    newer = moved_region(aws, "eu-west-3", "eu-central-1", "2031-01-01-00-00-00")
    _publish(served, "ip-ranges.json", json.dumps(newer))
    result = update(dest, base)
    assert result.returncode == 0, result.stderr
    lookup = iprange("--ranges-dir", str(dest), "lookup", AWS_EU_WEST_3)
    assert lookup.stdout.split() == [AWS_EU_WEST_3, "AWS", "eu-central-1"]


def test_update_without_a_destination_says_what_is_missing() -> None:
    result = subprocess.run([sys.executable, "-m", "iprange", "update"], capture_output=True, text=True,
                            timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 2 and "--dest" in result.stderr


def test_atomic_write_leaves_only_the_target(tmp_path: Path) -> None:
    target = tmp_path / AWS_FILE
    target.write_text("old")
    write_atomically(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == [AWS_FILE]
