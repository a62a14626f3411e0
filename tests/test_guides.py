"""The user guides (docs/debugging.md, docs/mirroring.md): what can be checked without servers.

The commands the guides run against servers are run by the integration
tests (tests/integration/test_mirroring_guide.py, test_debugging_guide.py).
Here: every block carries a mark (tests/guides.py says which), the blocks
for tools this machine lacks parse (shell syntax, TOML, YAML, JSON), and
the lists that an `archeio` command prints are exactly its output.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from archeio.cli import main
from archeio.config import SETTINGS

from .guides import GUIDES, Block, blocks, unmarked

MARKS = {"mirroring-test", "debugging-test", "not-run", "output", "covers"}
ROOT = Path(__file__).resolve().parents[1]


def all_blocks() -> list[tuple[str, Block]]:
    return [(guide.name, block) for guide in GUIDES for block in blocks(guide)]


def block_id(item: tuple[str, Block]) -> str:
    name, block = item
    return f"{name}:{block.lang}:{block.body.splitlines()[0][:40] if block.body else ''}"


NOT_RUN = [item for item in all_blocks() if item[1].mark == "not-run"]


def test_every_code_block_of_the_guides_is_marked() -> None:
    assert [line for guide in GUIDES for line in unmarked(guide)] == []


def test_marks_are_known_and_blocks_not_run_say_why() -> None:
    for name, block in all_blocks():
        assert block.mark in MARKS, (name, block.mark)
        if block.mark == "not-run":
            assert block.label, (name, block.body[:80])


def test_both_guides_have_blocks_for_tools_this_machine_lacks() -> None:
    why = " ".join(block.label or "" for _, block in NOT_RUN)
    for tool in ("crane", "gcrane", "oras", "kubeadm", "Harbor", "CRI-O", "containerd 2", "aws"):
        assert tool in why, tool


@pytest.mark.parametrize("item", NOT_RUN, ids=block_id)
def test_blocks_not_run_here_parse(item: tuple[str, Block]) -> None:
    _, block = item
    if block.lang == "sh":
        done = subprocess.run(["bash", "-n", "-c", block.body], capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        # JSON handed to a command in single quotes: request bodies, pod overrides.
        for document in re.findall(r"(?:-d |--overrides=)'(\{.*?\})'", block.body, re.S):
            json.loads(document)
    elif block.lang == "toml":
        tomllib.loads(block.body)
    elif block.lang == "yaml":
        assert list(yaml.safe_load_all(block.body))
    elif block.lang == "json":
        json.loads(block.body)
    else:
        raise AssertionError(f"no check for {block.lang!r}")


def command_output(command: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> str:
    """What an `archeio` command prints with the default settings (registry.k8s.io's), from the repository root."""
    argv = shlex.split(command)
    assert argv[0] == "archeio", command
    for setting in SETTINGS:
        monkeypatch.delenv(setting.env, raising=False)
    monkeypatch.chdir(ROOT)
    capsys.readouterr()
    assert main(argv[1:]) == 0
    return capsys.readouterr().out


OUTPUTS = [item for item in all_blocks() if item[1].mark == "output"]


@pytest.mark.parametrize("item", OUTPUTS, ids=block_id)
def test_a_listed_output_is_the_commands_output(
        item: tuple[str, Block], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    _, block = item
    assert block.label is not None
    assert block.body == command_output(block.label, capsys, monkeypatch)


def test_the_debugging_guide_lists_the_hosts() -> None:
    assert [b.label for _, b in OUTPUTS if b.label and b.label.startswith("archeio hosts")]


REGIONS_TABLE = "deploy/cloudrun/regions.toml"


def test_the_hosts_list_takes_the_cloud_run_regions_table_where_the_repository_has_one() -> None:
    """registry.k8s.io runs in many regions, each with its own source and default mirror: all are listed.

    Until the table exists (it comes with the Cloud Run deployment), the list
    is the settings' alone; from then on the guide must use it (and
    scripts/guide-outputs rewrites the list).
    """
    commands = [b.label or "" for _, b in all_blocks() if b.mark in ("output", "covers")
                and (b.label or "").startswith("archeio hosts")]
    assert commands
    if (ROOT / REGIONS_TABLE).exists():
        assert all(f"--regions {REGIONS_TABLE}" in command for command in commands), commands


@pytest.mark.parametrize("item", [i for i in all_blocks() if i[1].mark == "covers"], ids=block_id)
def test_patterns_cover_the_listed_hosts_and_none_is_idle(
        item: tuple[str, Block], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    _, block = item
    assert block.label is not None
    hosts = command_output(block.label, capsys, monkeypatch).split()
    patterns = block.body.split()
    assert [h for h in hosts if not any(fnmatch.fnmatchcase(h, p) for p in patterns)] == []
    assert [p for p in patterns if not any(fnmatch.fnmatchcase(h, p) for h in hosts)] == []
