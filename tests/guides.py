"""The user guides' code blocks, as the tests read them (docs/debugging.md, docs/mirroring.md).

Every `sh`, `python`, `toml`, `yaml` and `json` block of a guide carries a
mark on the line before it, so none is left out of the tests by accident:

- `<!-- mirroring-test -->`, `<!-- debugging-test -->`: commands the
  integration tests run, in order, against local servers (only the host
  names replaced);
- `<!-- mirroring-test: LABEL -->`, `<!-- debugging-test: LABEL -->`: a
  file the block stands for (a runtime's configuration, a list of images),
  which the tests use as that file;
- `<!-- not-run: WHY -->`: a command or file for a tool this machine lacks
  (crane, kubeadm, Harbor...); WHY names it, and tests/test_guides.py checks
  what a local tool can: shell syntax (`bash -n`), TOML, YAML and JSON;
- `<!-- output: COMMAND -->`: a `text` block that is exactly what the
  `archeio` COMMAND prints (tests/test_guides.py runs it and compares).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"
DEBUGGING = DOCS / "debugging.md"
MIRRORING = DOCS / "mirroring.md"
GUIDES = (DEBUGGING, MIRRORING)
CHECKED_LANGUAGES = ("sh", "python", "toml", "yaml", "json")

_MARKED = re.compile(
    r"<!-- (?P<mark>[a-z-]+)(?:: (?P<label>[^>]+?))? -->\n```(?P<lang>\w*)\n(?P<body>.*?)```", re.S)
_FENCE = re.compile(r"^```(?P<lang>\w*)$", re.M)


@dataclass(frozen=True)
class Block:
    mark: str  # mirroring-test, debugging-test, not-run, output
    label: str | None  # the file the block stands for, why it is not run, or the command it is the output of
    lang: str
    body: str


def blocks(guide: Path, mark: str | None = None) -> list[Block]:
    """The marked blocks of a guide, in order; only those with `mark` when given."""
    found = [Block(m["mark"], m["label"], m["lang"], m["body"]) for m in _MARKED.finditer(guide.read_text())]
    return [b for b in found if mark is None or b.mark == mark]


def unmarked(guide: Path) -> list[str]:
    """The first line of every checked-language block that carries no mark."""
    text = guide.read_text()
    marked_starts = {m.start("lang") - 3 for m in _MARKED.finditer(text)}
    missing = []
    fences = list(_FENCE.finditer(text))
    for opening in fences[::2]:  # fences alternate: opening, closing
        if opening["lang"] in CHECKED_LANGUAGES and opening.start() not in marked_starts:
            first = text[opening.end() + 1:].split("\n", 1)[0]
            missing.append(f"{guide.name}: ```{opening['lang']} {first}")
    return missing
