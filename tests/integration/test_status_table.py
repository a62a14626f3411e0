"""The registry's column of the status table in docs/request-handling.md, against real docker-registry 2.8.

For each row that names a registry answer, the request goes where the
redirect would take a client: where archeio redirects to a registry, to
archeio's own Location (asked of the session's `archeio serve`); where
archeio answers itself or sends a blob to a mirror, to the Go server's
target, `path.Join("/v2/", UPSTREAM_REGISTRY_PATH, rest)` on the source
registry. The table's `pause` is the suite's `alpha` (tags v1 to v5).
"""

from __future__ import annotations

import http.client
import json
import posixpath
from urllib.parse import urlsplit

import pytest

from ..status_table import Row, read_rows
from . import images
from .services import Archeio, Registry
from .topology import UPSTREAM_PATH, Catalog

pytestmark = pytest.mark.integration

ROWS = [row for row in read_rows() if row.registry_status is not None]
# What skopeo sends: without it the registry hides OCI manifests behind a 404.
ACCEPT = ", ".join([images.OCI_MANIFEST, images.OCI_INDEX])


def raw_get(url: str) -> tuple[int, dict[str, str], bytes]:
    """GET `url` with its path sent exactly as written (no dot-segment cleaning)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.netloc, timeout=10)
    try:
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        connection.request("GET", target, headers={"Accept": ACCEPT})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def concrete(row: Row, catalog: Catalog) -> str:
    path = row.concrete_path({
        "<path>": UPSTREAM_PATH,
        "<manifest>": catalog.alpha.digest,
        "<layer>": catalog.alpha.layers[0].digest,
        "<sig>": images.signature_tag(catalog.alpha.digest),
        "<sig-manifest>": catalog.signature.digest,
        "<sig-layer>": catalog.signature.layers[0].digest,
    })
    path = path.replace("/pause/", "/alpha/").replace("/Pause/", "/Alpha/")
    return path + (f"?{row.query}" if row.query else "")


@pytest.mark.parametrize("row", [pytest.param(row, id=row.case) for row in ROWS])
def test_registry_answers_as_the_table_says(
    archeio: Archeio, registry: Registry, catalog: Catalog, row: Row,
) -> None:
    target = concrete(row, catalog)
    if row.target in ("upstream", "signature upstream"):
        status, headers, _ = raw_get(archeio.url + target)
        assert status == 307
        url = headers["location"]
    else:
        path, _, query = target.partition("?")
        # The Go server's target: path.Join cleans dot segments (and drops the query).
        url = registry.url + posixpath.normpath(f"/v2/{UPSTREAM_PATH}/{path.removeprefix('/v2/')}")
    status, headers, body = raw_get(url)
    assert status == row.registry_status, (url, body[:300])
    if row.registry_code is not None:
        assert json.loads(body)["errors"][0]["code"] == row.registry_code
    if row.registry_plain_text:
        assert headers["content-type"].startswith("text/plain")
