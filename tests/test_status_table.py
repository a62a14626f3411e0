"""Every row of the status table in docs/request-handling.md, against a running server.

The rows are read from the document (tests/status_table.py). Each request
is sent as raw bytes over a socket, so that paths such as `/v2/pause/../x`
reach the server exactly as written. The client is a direct connection
from 127.0.0.1 (in no cloud), so blobs are checked in the default mirror: a
stand-in bucket that holds `<layer>` and nothing else. The signature
upstream is a registry of its own, so the signature fallback is on: the
upstream is the same stand-in at its root, holding `pause`'s `<manifest>`
and `<layer>` and nothing else.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from .conftest import make_settings
from .status_table import Row, read_rows

SIGNATURES = "http://signatures.example"
PATH = "k8s-artifacts-prod/images"
MANIFEST = "sha256:" + "1" * 64
LAYER = "sha256:" + "2" * 64
PLACEHOLDERS = {
    "<path>": PATH,
    "<manifest>": MANIFEST,
    "<layer>": LAYER,
    "<sig>": "sha256-" + "1" * 64 + ".sig",
    # cosign's signature manifest and its layer: only in the signature registry.
    "<sig-manifest>": "sha256:" + "3" * 64,
    "<sig-layer>": "sha256:" + "4" * 64,
}
ROWS = read_rows()


async def exchange(port: int, method: str, target: str) -> tuple[int, dict[str, str], bytes]:
    """One request as raw bytes; (status, headers with lower-case names, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {target} HTTP/1.1\r\nHost: registry.test\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), timeout=10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def expected_location(row: Row, path: str, upstream: str) -> str:
    """Where a redirect of `row` must point.

    Registry targets: the repository `<path>/<name>` on the right registry,
    a name already under `<path>/` taken as it is; the query kept.
    """
    if row.target == "mirror":
        return "MIRROR/containers/images/" + path.rsplit("/", 1)[1]
    base = SIGNATURES if row.target == "signature upstream" else upstream
    rest = path.removeprefix("/v2/").removeprefix(PATH + "/")
    return f"{base}/v2/{PATH}/{rest}" + (f"?{row.query}" if row.query else "")


@pytest.fixture
async def server(engine: str, start_server: Any, bucket: Any) -> Any:
    """A running server on each HTTP engine in turn (tests/engines.py)."""
    bucket.add("cdn", LAYER)
    bucket.add_to_registry(f"{PATH}/pause", MANIFEST)
    bucket.add_to_registry(f"{PATH}/pause", LAYER)
    settings = make_settings(
        PORT="0", ARCHEIO_HOST="127.0.0.1",
        UPSTREAM_REGISTRY_ENDPOINT=bucket.url, UPSTREAM_REGISTRY_PATH=PATH,
        SIGNATURE_UPSTREAM_ENDPOINT=SIGNATURES,
        DEFAULT_AWS_BASE_URL=bucket.base("cdn"),
    )
    return await start_server(settings)


def test_the_table_covers_every_kind_of_answer() -> None:
    """A guard against a table cut short by an edit: each answer kind has rows."""
    answers = {(row.status, row.code or row.target) for row in ROWS}
    assert {(404, "MANIFEST_UNKNOWN"), (400, "DIGEST_INVALID"), (400, "NAME_INVALID"), (307, "upstream"),
            (307, "mirror"), (307, "signature upstream"), (200, None)} <= answers


@pytest.mark.parametrize(
    ("row", "method"),
    [pytest.param(row, method, id=f"{row.case}-{method}") for row in ROWS for method in row.methods],
)
async def test_archeio_answers_as_the_table_says(server: Any, bucket: Any, row: Row, method: str) -> None:
    path = row.concrete_path(PLACEHOLDERS)
    target = path + (f"?{row.query}" if row.query else "")
    status, headers, body = await exchange(server.port, method, target)
    assert status == row.status, (target, body)
    if row.status == 307:
        location = headers["location"].replace(bucket.base("cdn"), "MIRROR")
        assert location == expected_location(row, path, bucket.url)
    elif row.code is not None:
        assert headers["content-type"] == "application/json"
        if method == "HEAD":
            assert body == b""
        else:
            assert json.loads(body)["errors"][0]["code"] == row.code
