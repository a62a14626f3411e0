"""Paged tag lists and referrers, followed through archeio by real clients.

The upstreams here page in twos (paging_registry.py in front of the real
registries) and link each next page as `/v2/<upstream path>/<name>/...`.
Clients send that path back to archeio, which must send it to the same
upstream path, not prefix it again. skopeo (containers/image) follows tag
list links; it never calls the referrers API, so a plain HTTP client
follows those links, as the spec describes, through archeio.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from . import images
from .topology import PAGINATED_TAGS, UPSTREAM_PATH, Catalog, PagedWorld

pytestmark = pytest.mark.integration


def next_link(response: requests.Response) -> str | None:
    """The path and query of a `Link: <...>; rel="next"` header, as containers/image keeps it."""
    link = response.headers.get("Link")
    if link is None:
        return None
    target, _, rel = link.partition(";")
    assert rel.strip() == 'rel="next"', link
    parts = urlsplit(target.strip().strip("<>"))
    return parts.path + (f"?{parts.query}" if parts.query else "")


def follow_referrers(paged: PagedWorld, path: str) -> list[list[dict[str, object]]]:
    """Every page of a referrers list, each page fetched by asking archeio first."""
    pages = []
    next_path: str | None = path
    while next_path is not None:
        redirect = requests.get(paged.archeio.url + next_path, allow_redirects=False, timeout=10)
        assert redirect.status_code == 307, redirect.text
        location = redirect.headers["Location"]
        assert location.startswith(f"{paged.signatures.url}/v2/{UPSTREAM_PATH}/alpha/referrers/"), location
        page = requests.get(location, timeout=10)
        assert page.status_code == 200, page.text
        assert page.headers["Content-Type"] == images.OCI_INDEX
        pages.append(page.json()["manifests"])
        next_path = next_link(page)
        assert len(pages) <= 10, "the links do not end"
    return pages


def test_skopeo_list_tags_returns_every_tag_of_a_paged_list(paged: PagedWorld, catalog: Catalog) -> None:
    mark = paged.upstream.log.mark()
    listed = json.loads(images.skopeo(
        "list-tags", "--tls-verify=false", "--no-creds", f"docker://{paged.archeio.host}/{catalog.alpha.name}",
    ).stdout)
    assert sorted(listed["Tags"]) == sorted(PAGINATED_TAGS)
    pages = [r for r in paged.upstream.log.since(mark) if r.path.endswith("/tags/list")]
    # Five tags in pages of two: three pages, every one at the upstream path.
    assert [(r.path, r.status) for r in pages] == [(f"/v2/{UPSTREAM_PATH}/alpha/tags/list", 200)] * 3
    assert [r.query for r in pages] == ["", "n=2&last=v2", "n=2&last=v4"]


def test_skopeo_sync_copies_every_tag_of_a_paged_list(paged: PagedWorld, catalog: Catalog, tmp_path: Path) -> None:
    images.skopeo(
        "sync", "--src", "docker", "--dest", "dir", "--src-tls-verify=false", "--src-no-creds",
        f"{paged.archeio.host}/{catalog.alpha.name}", str(tmp_path), timeout=120,
    )
    copied = {path.name for path in tmp_path.iterdir()}
    assert copied == {f"alpha:{tag}" for tag in PAGINATED_TAGS}
    for name in copied:
        manifest = (tmp_path / name / "manifest.json").read_bytes()
        assert "sha256:" + hashlib.sha256(manifest).hexdigest() == catalog.alpha.digest


def test_plain_client_follows_every_referrers_page_through_archeio(paged: PagedWorld, catalog: Catalog) -> None:
    pages = follow_referrers(paged, f"/v2/alpha/referrers/{catalog.alpha.digest}")
    assert [len(page) for page in pages] == [2, 2, 1]
    assert [d["digest"] for page in pages for d in page] == [a.digest for a in paged.referrers]


def test_referrers_filter_survives_every_page(paged: PagedWorld, catalog: Catalog) -> None:
    sbom = "application/vnd.example.sbom.v1"
    pages = follow_referrers(paged, f"/v2/alpha/referrers/{catalog.alpha.digest}?artifactType={sbom}")
    found = [d for page in pages for d in page]
    assert [len(page) for page in pages] == [2, 1]
    assert {d["artifactType"] for d in found} == {sbom}
    assert len(found) == sum(1 for a in paged.referrers if json.loads(a.manifest.data)["artifactType"] == sbom)
