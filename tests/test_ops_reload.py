"""Live range reloads: the verdict per provider, refused files, and a reload under load.

The judging is a pure function, tested by a table; the reloader runs on a
real RequestFlow with real range files in a temporary directory; and a real
`archeio serve --workers 2` is hammered with blob requests while SIGHUP
swaps a client's region: every answer must be one of the two valid
redirects, none may fail.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from archeio.app import RequestFlow
from archeio.existence import BlobExistenceCache
from archeio.reload import (
    LOADED,
    REFUSED_LOSS,
    REFUSED_MISSING,
    REFUSED_OLDER,
    REFUSED_UNPARSEABLE,
    UNCHANGED,
    RangeReloader,
    judge,
)
from iprange import AWS, GCP, Placement, ProviderRanges, RangeFileError, load_index

from .conftest import AWS_EU_WEST_3, make_settings
from .ops_support import (
    BLOB,
    ArcheioProcess,
    ThreadedBucket,
    moved_region,
    range_documents,
    scrape,
    total,
    write_mirrors,
    write_ranges,
    xff,
)

NEWER = "2030-01-01-00-00-00"
OLDER = "2020-01-01-00-00-00"

# -- the verdict, by table ----------------------------------------------------------


def _aws(serial: str, count: int) -> ProviderRanges:
    return ProviderRanges(AWS, tuple((f"10.{i}.0.0/16", "r") for i in range(count)), serial, serial)


@pytest.mark.parametrize(
    ("loaded", "candidate", "outcome"),
    [
        (_aws("2026", 100), _aws("2027", 100), LOADED),
        (_aws("2026", 100), _aws("2027", 80), LOADED),  # exactly the allowed loss
        (_aws("2026", 100), _aws("2027", 79), REFUSED_LOSS),
        (_aws("2026", 100), _aws("2027", 500), LOADED),  # growth is fine
        (_aws("2026", 100), _aws("2025", 100), REFUSED_OLDER),
        (_aws("2026", 100), _aws("2026", 100), UNCHANGED),
        (_aws("2026", 100), RangeFileError("not JSON"), REFUSED_UNPARSEABLE),
        (_aws("2026", 100), None, REFUSED_MISSING),
        (None, _aws("2026", 3), LOADED),  # a provider new to the directory
        (None, None, UNCHANGED),
    ],
)
def test_judge_per_provider(
    loaded: ProviderRanges | None, candidate: ProviderRanges | RangeFileError | None, outcome: str
) -> None:
    verdict = judge(AWS, loaded, candidate, max_loss=0.2)
    assert verdict.outcome == outcome
    # Whatever the verdict, there is data to serve unless there never was any.
    expected_keep = candidate if outcome == LOADED else loaded
    assert verdict.keep is expected_keep


# -- the reloader on a real RequestFlow ------------------------------------------------------


@pytest.fixture
def docs() -> tuple[dict[str, Any], dict[str, Any]]:
    return range_documents()


def _reloading(directory: Path, aws: dict[str, Any], gcp: dict[str, Any]) -> RangeReloader:
    """A reloader of a real RequestFlow serving the given files, with its own counts."""
    write_ranges(directory, aws, gcp)
    settings = make_settings(ARCHEIO_RANGES_DIR=str(directory))
    flow = RequestFlow(settings, load_index(directory), BlobExistenceCache.from_settings(settings))
    return RangeReloader(flow, directory, 0.2, Counter())


def _garbage(directory: Path, aws: dict[str, Any]) -> None:
    (directory / "aws-ip-ranges.json").write_text("{ this is not JSON")


def _wrong_shape(directory: Path, aws: dict[str, Any]) -> None:
    write_ranges(directory, {"createDate": NEWER, "prefixes": "none"})


def _bad_prefix(directory: Path, aws: dict[str, Any]) -> None:
    broken = dict(aws, createDate=NEWER)
    broken["prefixes"] = [*aws["prefixes"], {"ip_prefix": "35.180.0.0/99", "region": "x"}]
    write_ranges(directory, broken)


def _older(directory: Path, aws: dict[str, Any]) -> None:
    write_ranges(directory, moved_region(aws, "eu-west-3", "eu-central-1", OLDER))


def _too_much_loss(directory: Path, aws: dict[str, Any]) -> None:
    half = moved_region(aws, "eu-west-3", "eu-central-1", NEWER)
    half["prefixes"] = half["prefixes"][: len(half["prefixes"]) // 3]
    half["ipv6_prefixes"] = []
    write_ranges(directory, half)


def _missing(directory: Path, aws: dict[str, Any]) -> None:
    (directory / "aws-ip-ranges.json").unlink()


@pytest.mark.parametrize(
    ("spoil", "outcome"),
    [
        (_garbage, REFUSED_UNPARSEABLE),
        (_wrong_shape, REFUSED_UNPARSEABLE),
        (_bad_prefix, REFUSED_UNPARSEABLE),
        (_older, REFUSED_OLDER),
        (_too_much_loss, REFUSED_LOSS),
        (_missing, REFUSED_MISSING),
    ],
)
async def test_refused_file_keeps_the_loaded_data_and_is_counted(
    tmp_path: Path, docs: tuple[dict[str, Any], dict[str, Any]], spoil: Any, outcome: str,
) -> None:
    aws, gcp = docs
    reloader = _reloading(tmp_path, aws, gcp)
    flow, counts = reloader.flow, reloader.counts
    loaded = flow.index.providers[AWS]
    spoil(tmp_path, aws)

    verdicts = {v.cloud: v.outcome for v in await reloader.reload("test")}

    assert verdicts[AWS] == outcome
    assert flow.index.providers[AWS] is loaded
    assert flow.index.lookup(AWS_EU_WEST_3) == Placement(AWS, "eu-west-3")
    assert counts[(AWS, outcome)] == 1
    assert counts[(GCP, UNCHANGED)] == 1


async def test_newer_file_is_swapped_in_and_other_providers_keep_theirs(
    tmp_path: Path, docs: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    aws, gcp = docs
    reloader = _reloading(tmp_path, aws, gcp)
    flow, counts = reloader.flow, reloader.counts
    gcp_loaded = flow.index.providers[GCP]
    before = reloader.loaded_at[AWS]
    write_ranges(tmp_path, moved_region(aws, "eu-west-3", "eu-central-1", NEWER))

    await reloader.reload("test")

    assert flow.index.lookup(AWS_EU_WEST_3) == Placement(AWS, "eu-central-1")
    assert flow.index.providers[AWS].serial == NEWER
    assert flow.index.providers[GCP] is gcp_loaded
    assert reloader.loaded_at[AWS] >= before
    assert counts == Counter({(AWS, LOADED): 1, (GCP, UNCHANGED): 1})


async def test_refresh_timer_picks_up_a_new_file(
    tmp_path: Path, docs: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    aws, gcp = docs
    reloader = _reloading(tmp_path, aws, gcp)
    flow = reloader.flow
    refresh = asyncio.get_running_loop().create_task(reloader.refresh_every(0.05))
    try:
        write_ranges(tmp_path, moved_region(aws, "eu-west-3", "eu-central-1", NEWER))
        for _ in range(1000):
            if flow.index.lookup(AWS_EU_WEST_3) == Placement(AWS, "eu-central-1"):
                break
            await asyncio.sleep(0.01)
        assert flow.index.lookup(AWS_EU_WEST_3) == Placement(AWS, "eu-central-1")
    finally:
        refresh.cancel()


# -- a reload under load, in a real two-worker server --------------------------------------


async def _hammer(url: str, stop: asyncio.Event, confirmed: asyncio.Event,
                  results: list[tuple[bool, int, str | None]], failures: list[str]) -> None:
    """GET the blob until told to stop; remember (sent after the reload was confirmed, status, Location)."""
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            after = confirmed.is_set()
            try:
                async with session.get(url, headers=xff(AWS_EU_WEST_3), allow_redirects=False) as response:
                    results.append((after, response.status, response.headers.get("Location")))
            except (aiohttp.ClientError, OSError) as exc:
                failures.append(repr(exc))


async def _poll(condition: Any, what: str, timeout: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await asyncio.to_thread(condition):
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_reload_under_concurrent_requests_loses_and_misroutes_nothing(tmp_path: Path) -> None:
    aws, gcp = range_documents()
    ranges = tmp_path / "ranges"
    ranges.mkdir()
    write_ranges(ranges, aws, gcp)
    with ThreadedBucket() as bucket:
        mirrors = write_mirrors(tmp_path / "mirrors.toml", {
            "eu-west-3": bucket.base("paris"), "eu-central-1": bucket.base("frankfurt"),
        })
        paris = f"{bucket.base('paris')}/containers/images/{BLOB}"
        frankfurt = f"{bucket.base('frankfurt')}/containers/images/{BLOB}"
        env = {"ARCHEIO_WORKERS": "2", "ARCHEIO_RANGES_DIR": str(ranges), "ARCHEIO_MIRRORS_FILE": str(mirrors)}
        with ArcheioProcess(tmp_path / "stderr.log", **env) as server:
            url = f"{server.url}/v2/pause/blobs/{BLOB}"
            stop, confirmed = asyncio.Event(), asyncio.Event()
            results: list[tuple[bool, int, str | None]] = []
            failures: list[str] = []
            hammers = [asyncio.create_task(_hammer(url, stop, confirmed, results, failures)) for _ in range(12)]
            try:
                await _poll(lambda: len(results) >= 300 or failures, "requests before the reload")
                write_ranges(ranges, moved_region(aws, "eu-west-3", "eu-central-1", NEWER))
                server.signal(signal.SIGHUP)
                await _poll(lambda: total(scrape(server), "archeio_ranges_reloads_total",
                                          cloud=AWS, outcome=LOADED) == 2, "both workers to reload")
                confirmed.set()
                seen = len(results)
                await _poll(lambda: len(results) >= seen + 300 or failures, "requests after the reload")
            finally:
                stop.set()
                await asyncio.gather(*hammers)

            assert failures == []
            assert {status for _, status, _ in results} == {307}
            locations = Counter(location for _, _, location in results)
            assert set(locations) == {paris, frankfurt}, locations
            assert {location for after, _, location in results if after} == {frankfurt}

            # A broken file afterwards is refused by both workers; routing stays on the new data.
            (ranges / "aws-ip-ranges.json").write_text(json.dumps({"createDate": "2031"}))
            server.signal(signal.SIGHUP)
            await _poll(lambda: total(scrape(server), "archeio_ranges_reloads_total",
                                      cloud=AWS, outcome=REFUSED_UNPARSEABLE) == 2, "the refusal to be counted")
            async with aiohttp.ClientSession() as session:
                async with session.get(url, headers=xff(AWS_EU_WEST_3), allow_redirects=False) as response:
                    assert (response.status, response.headers["Location"]) == (307, frankfurt)
            refusals = [e for e in server.log_entries() if e.get("outcome") == REFUSED_UNPARSEABLE]
            assert len(refusals) == 2 and all(e["severity"] == "WARNING" for e in refusals)
