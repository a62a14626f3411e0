"""The status table of docs/request-handling.md, read as test data.

The table between `<!-- status-table -->` and `<!-- /status-table -->` has
one row per kind of reference: the request, the spec's word, archeio's
answer, the Go server's and docker-registry's. Tests read it from the
document itself, so the document and the tests cannot drift apart:
tests/test_status_table.py checks archeio's column against a running
server, tests/integration/test_status_table.py the registry's column
against a real docker-registry.

Cells are read like this:
- request: `METHOD[, METHOD] /path[?query]` in backticks, with placeholders
  (`<manifest>`, `<layer>`, ...) that each test fills in;
- archeio: `STATUS CODE` for an answer of our own (`404 MANIFEST_UNKNOWN`),
  `STATUS` alone, or `307 upstream|mirror|signature upstream` for a redirect;
- docker-registry: `STATUS` and an optional OCI code, or `—` when no
  registry is asked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "request-handling.md"
START, END = "<!-- status-table -->", "<!-- /status-table -->"

# Placeholder values that do not depend on the world a test builds.
FIXED_PLACEHOLDERS = {
    "<absent>": "sha256:" + "a" * 64,
    "<upper>": "sha256:" + "A" * 64,
    "<long-tag>": "t" * 129,
    "<long-name>": "n" * 256,
}

_REQUEST = re.compile(r"`(?P<methods>[A-Z]+(?:, [A-Z]+)*) (?P<target>\S+)`")
_OURS = re.compile(r"(?P<status>\d{3})(?: (?P<rest>.+))?")
_REGISTRY = re.compile(r"(?P<status>\d{3})(?: (?P<code>[A-Z_]+)\b)?")


@dataclass(frozen=True)
class Row:
    case: str
    methods: tuple[str, ...]
    path: str  # with placeholders
    query: str
    status: int  # archeio's
    code: str | None  # archeio's OCI error code, for an answer of our own
    target: str | None  # "upstream", "mirror" or "signature upstream", for a 307
    registry_status: int | None
    registry_code: str | None
    registry_plain_text: bool  # the registry's router answers, not its API: no JSON

    def concrete_path(self, values: dict[str, str]) -> str:
        """The path with every placeholder replaced; KeyError names a missing one."""
        path = self.path
        for name in re.findall(r"<[a-z-]+>", path):
            path = path.replace(name, values.get(name) or FIXED_PLACEHOLDERS[name])
        return path


def _row(cells: list[str]) -> Row:
    case, request, _spec, ours, _go, registry = cells
    found = _REQUEST.fullmatch(request)
    if found is None:
        raise ValueError(f"status table: unreadable request {request!r}")
    path, _, query = found["target"].partition("?")
    answer = _OURS.fullmatch(ours)
    if answer is None:
        raise ValueError(f"status table: unreadable archeio answer {ours!r}")
    status, rest = int(answer["status"]), answer["rest"]
    code = target = None
    if status == 307:
        target = rest.split(" (")[0] if rest else None
        if target not in ("upstream", "mirror", "signature upstream"):
            raise ValueError(f"status table: unknown redirect target in {ours!r}")
    elif rest:
        code = rest
    registry_status = registry_code = None
    if registry != "—":
        seen = _REGISTRY.match(registry)
        if seen is None:
            raise ValueError(f"status table: unreadable registry answer {registry!r}")
        registry_status, registry_code = int(seen["status"]), seen["code"]
    return Row(case, tuple(found["methods"].split(", ")), path, query, status, code, target,
               registry_status, registry_code, "plain text" in registry)


def _cells(line: str) -> list[str]:
    # Cells hold no `|` of their own; strip the outer pipes and split.
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def read_rows(doc: Path = DOC) -> list[Row]:
    """Every row of the status table, in order."""
    text = doc.read_text()
    body = text[text.index(START) + len(START):text.index(END)]
    lines = [line for line in body.strip().splitlines() if line.startswith("|")]
    header, rule, *rows = lines
    if len(_cells(header)) != 6 or not set(rule) <= set("|- "):
        raise ValueError("status table: expected 6 columns")
    return [_row(_cells(line)) for line in rows]
