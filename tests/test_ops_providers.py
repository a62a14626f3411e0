"""Readiness reflects the routing data (issue 18, item 3).

A server without Google Cloud's ranges, or without those of a cloud of its
mirror table, sends those clients' blobs to the CDN: it answers, but every
such answer costs egress, and nothing says so. So it refuses to start (exit
2, one line naming the directory), unless ARCHEIO_OPTIONAL_PROVIDERS lets
the provider be absent; a reload never drops a required provider; and
`archeio_ranges_prefixes` is exported for every expected provider, 0 when
absent. One process and `--workers 2` alike: the supervisor refuses a
missing file before it starts a worker, and stops with status 2 when a
worker finds what only parsing can (a file without prefixes).
"""

from __future__ import annotations

import json
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from archeio.app import RequestFlow
from archeio.existence import BlobExistenceCache
from archeio.providers import expected_providers, missing_providers, required_providers
from archeio.reload import LOADED, REFUSED_LOSS, RangeReloader
from iprange import AWS, AZURE, GCP, load_index

from .conftest import GOOGLE_CLOUD, make_settings
from .ops_support import ArcheioProcess, range_documents, scrape, total, wait_for, write_ranges
from .test_cli import run_archeio

NEWER = "2030-01-01T00:00:00.000000"
AZURE_ONLY_MIRRORS = '[mirrors.Azure]\n"westeurope" = "https://azure-mirror.example/base"\n'
NO_MIRRORS = "[mirrors.AWS]\n"  # a cloud named, no mirror given: its ranges are not needed


def _settings(tmp_path: Path, mirrors: str | None = None, optional: str = "") -> Any:
    env = {"ARCHEIO_OPTIONAL_PROVIDERS": optional}
    if mirrors is not None:
        (tmp_path / "mirrors.toml").write_text(mirrors)
        env["ARCHEIO_MIRRORS_FILE"] = str(tmp_path / "mirrors.toml")
    return make_settings(**env)


# -- which providers are expected and required (pure) --------------------------------


@pytest.mark.parametrize(
    ("mirrors", "optional", "expected", "required"),
    [
        (None, "", (AWS, GCP), (AWS, GCP)),  # the built-in AWS table
        (None, "aws", (AWS, GCP), (GCP,)),  # names in any case
        (None, "AWS,GCP", (AWS, GCP), ()),
        (None, "Azure", (AWS, GCP), (AWS, GCP)),  # optional, but never expected
        (AZURE_ONLY_MIRRORS, "", (GCP, AZURE), (GCP, AZURE)),
        (NO_MIRRORS, "", (GCP,), (GCP,)),
    ],
)
def test_google_cloud_and_the_mirror_tables_clouds_are_required_unless_optional(
    tmp_path: Path, mirrors: str | None, optional: str, expected: tuple[str, ...], required: tuple[str, ...],
) -> None:
    settings = _settings(tmp_path, mirrors, optional)
    assert expected_providers(settings) == expected
    assert required_providers(settings) == required


@pytest.mark.parametrize(
    ("present", "optional", "named"),
    [
        ((), "", "no provider's ranges"),
        ((), "AWS,GCP,Azure", "no provider's ranges"),  # none at all is never allowed
        ((AWS,), "", "GCP (gcp-cloud.json)"),
        ((GCP, AZURE), "", "AWS (aws-ip-ranges.json)"),
        ((GCP,), "", "AWS (aws-ip-ranges.json)"),
    ],
)
def test_missing_provider_is_named_with_its_file_and_the_directory(
    tmp_path: Path, present: tuple[str, ...], optional: str, named: str,
) -> None:
    settings = make_settings(ARCHEIO_RANGES_DIR=str(tmp_path), ARCHEIO_OPTIONAL_PROVIDERS=optional)
    problem = missing_providers(settings, present)
    assert problem is not None and named in problem and problem.startswith(str(tmp_path))


@pytest.mark.parametrize(("present", "optional"), [((AWS, GCP), ""), ((GCP,), "AWS"), ((AWS,), "GCP")])
def test_required_providers_present_is_no_problem(
    tmp_path: Path, present: tuple[str, ...], optional: str,
) -> None:
    settings = make_settings(ARCHEIO_RANGES_DIR=str(tmp_path), ARCHEIO_OPTIONAL_PROVIDERS=optional)
    assert missing_providers(settings, present) is None


# -- a start without them refuses: one process and two workers --------------------------


def _directory(tmp_path: Path, *clouds: str, empty_gcp: bool = False) -> Path:
    """A ranges directory holding the fixture files of `clouds` (Google Cloud's emptied if asked)."""
    ranges = tmp_path / "ranges"
    ranges.mkdir()
    aws, gcp = range_documents()
    if empty_gcp:
        gcp = dict(gcp, prefixes=[])
    write_ranges(ranges, aws if AWS in clouds else None, gcp if GCP in clouds else None)  # type: ignore[arg-type]
    return ranges


def _serve(ranges: Path, workers: str, **env: str) -> Any:
    return run_archeio("serve", env={
        "ARCHEIO_RANGES_DIR": str(ranges), "ARCHEIO_WORKERS": workers, "ARCHEIO_ADMIN_PORT": "0",
        "ARCHEIO_HOST": "127.0.0.1", "PORT": "0", **env,
    }, timeout=60)


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize(
    ("clouds", "named"),
    [((), "no provider's ranges"), ((AWS,), "no ranges for GCP (gcp-cloud.json)"),
     ((GCP,), "no ranges for AWS (aws-ip-ranges.json)")],
)
def test_start_without_a_required_providers_file_exits_2_in_one_line_naming_the_directory(
    tmp_path: Path, workers: str, clouds: tuple[str, ...], named: str,
) -> None:
    ranges = _directory(tmp_path, *clouds)
    result = _serve(ranges, workers)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(ranges) in lines[0] and named in lines[0], result.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_start_without_the_ranges_of_a_cloud_of_the_mirror_file_exits_2(tmp_path: Path, workers: str) -> None:
    ranges = _directory(tmp_path, AWS, GCP)
    (tmp_path / "mirrors.toml").write_text(AZURE_ONLY_MIRRORS)
    result = _serve(ranges, workers, ARCHEIO_MIRRORS_FILE=str(tmp_path / "mirrors.toml"))
    assert result.returncode == 2 and "no ranges for Azure (azure-service-tags.json)" in result.stderr, result.stderr


def test_google_cloud_file_without_prefixes_exits_2_naming_the_directory(tmp_path: Path) -> None:
    ranges = _directory(tmp_path, AWS, GCP, empty_gcp=True)
    result = _serve(ranges, "1")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert str(ranges) in lines[0] and "no ranges for GCP" in lines[0]


def test_workers_finding_a_file_without_prefixes_stop_the_supervisor_with_status_2(tmp_path: Path) -> None:
    # The file is there, so the supervisor starts the workers; only parsing
    # finds it empty, and a configuration error stops everything.
    ranges = _directory(tmp_path, AWS, GCP, empty_gcp=True)
    result = _serve(ranges, "2")
    assert result.returncode == 2
    assert any("cannot start" in line and str(ranges) in line and "no ranges for GCP" in line
               for line in result.stderr.splitlines()), result.stderr


def test_a_mirror_table_naming_an_unknown_cloud_exits_2(tmp_path: Path) -> None:
    (tmp_path / "mirrors.toml").write_text('[mirrors.aws]\n"eu-west-3" = "https://mirror.example"\n')
    result = run_archeio("serve", env={"ARCHEIO_MIRRORS_FILE": str(tmp_path / "mirrors.toml")})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "ARCHEIO_MIRRORS_FILE" in lines[0] and "[mirrors.aws]: unknown cloud" in lines[0]


# -- an optional provider absent: served, and exported as 0 ----------------------------------


@pytest.fixture(scope="module")
def without_aws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ArcheioProcess, Path]]:
    """Two workers on Google Cloud's ranges alone, AWS (of the built-in mirror table) optional."""
    tmp = tmp_path_factory.mktemp("optional")
    ranges = _directory(tmp, GCP)
    env = {"ARCHEIO_WORKERS": "2", "ARCHEIO_RANGES_DIR": str(ranges), "ARCHEIO_OPTIONAL_PROVIDERS": "AWS",
           "ARCHEIO_RANGES_MAX_LOSS": "1"}
    with ArcheioProcess(tmp / "stderr.log", **env) as server:
        yield server, ranges


def test_absent_optional_provider_is_exported_as_0_prefixes_by_every_worker(
    without_aws: tuple[ArcheioProcess, Path],
) -> None:
    server, _ = without_aws
    # Ready (ArcheioProcess waited for /readyz), and each worker says what it routes by.
    wait_for(lambda: {labels.get("worker") for name, labels, _ in scrape(server)
                      if name == "archeio_ranges_prefixes"} == {"0", "1"}, what="both workers' range data")
    samples = scrape(server)
    for worker in ("0", "1"):
        assert [value for name, labels, value in samples if name == "archeio_ranges_prefixes"
                and labels == {"cloud": AWS, "worker": worker}] == [0]
        assert total(samples, "archeio_ranges_prefixes", cloud=GCP, worker=worker) > 0
    assert not [labels for name, labels, _ in samples if labels.get("cloud") == AZURE]  # not expected: not there
    assert not [labels for name, labels, _ in samples
                if name == "archeio_ranges_loaded_timestamp_seconds" and labels.get("cloud") == AWS]


def test_reload_never_empties_a_required_provider_even_when_every_loss_is_allowed(
    without_aws: tuple[ArcheioProcess, Path],
) -> None:
    server, ranges = without_aws
    before = total(scrape(server), "archeio_ranges_prefixes", cloud=GCP)
    _, gcp = range_documents()
    (ranges / "gcp-cloud.json").write_text(json.dumps(dict(gcp, creationTime=NEWER, prefixes=[])))
    server.signal(signal.SIGHUP)
    wait_for(lambda: total(scrape(server), "archeio_ranges_reloads_total", cloud=GCP, outcome=REFUSED_LOSS) == 2,
             what="both workers to refuse the empty file")
    assert total(scrape(server), "archeio_ranges_prefixes", cloud=GCP) == before > 0


async def test_reload_may_empty_a_provider_that_is_not_required(tmp_path: Path) -> None:
    # The same empty file is loaded when Google Cloud is optional and every
    # loss is allowed: the refusal above is the rule for required providers.
    ranges = _directory(tmp_path, AWS, GCP)
    settings = make_settings(ARCHEIO_RANGES_DIR=str(ranges), ARCHEIO_OPTIONAL_PROVIDERS="GCP")
    flow = RequestFlow(settings, load_index(ranges), BlobExistenceCache.from_settings(settings))
    reloader = RangeReloader(flow, ranges, 1.0, Counter(), required_providers(settings))
    _, gcp = range_documents()
    (ranges / "gcp-cloud.json").write_text(json.dumps(dict(gcp, creationTime=NEWER, prefixes=[])))

    verdicts = {v.cloud: v.outcome for v in await reloader.reload("test")}

    assert verdicts[GCP] == LOADED
    assert flow.index.lookup(GOOGLE_CLOUD) is None
