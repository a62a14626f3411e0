"""A paginating front for a real docker-registry: the one sanctioned fake of the suite.

Debian's docker-registry 2.8 answers every tag whatever `n` and `last` say,
and has no referrers API, so no real upstream here pages. This small
server stands in front of one and proxies every request to it unchanged,
except two it answers itself from the registry's own data:

- `GET /v2/<name>/tags/list`: the registry's full list, sorted as the spec
  says (lexical, case-insensitive), cut by `last` and `n`, in pages of 2
  when no `n` is asked, with `Link: </v2/<name>/tags/list?n=..&last=..>;
  rel="next"` while more remain; `n=0` gets an empty list and no `Link`.
- `GET /v2/<name>/referrers/<digest>`: the index the registry holds under
  the referrers tag schema (`<alg>-<hex>`), filtered by `artifactType`, in
  pages of 2 linked by `?last=<digest of the page's last descriptor>`.

The `Link` names the repository as the registry knows it, which is the
whole point: it is what a real registry sends back through archeio.

Given the registry's storage directory, every tag-list page also carries
the `manifest` map of Google's registries (Artifact Registry, Container
Registry): every manifest the repository holds, tagged or not, as
`"<digest>": {"imageSizeBytes": "<config and layers>", "layerId": "",
"mediaType": "...", "tag": [...], "timeCreatedMs": "...",
"timeUploadedMs": "..."}`, the numbers as strings (GCR's way), the whole map
on every page. The registry's API cannot list untagged manifests, so they
come from its own storage (the distribution filesystem layout: a
`_manifests/revisions/<algorithm>/<hex>/link` per manifest, a
`_manifests/tags/<tag>/current/link` per tag); each manifest's media type
and size come from the registry itself.

Run as a script (stdlib only): `paging_registry.py REGISTRY_URL PORT
[STORAGE_DIR]`. It logs one `"GET /path HTTP/1.1" status` line per request
to stderr, which `services.RequestLog` reads.
"""

from __future__ import annotations

import http.client
import json
import re
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

PAGE = 2
TAGS = re.compile(r"/v2/(?P<name>.+)/tags/list")
REFERRERS = re.compile(r"/v2/(?P<name>.+)/referrers/(?P<algorithm>[a-z0-9]+):(?P<encoded>[a-f0-9]+)")
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST_TYPES = ", ".join((
    OCI_INDEX, "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
))
# Hop-by-hop headers, and the length we set ourselves.
NOT_FORWARDED = {"connection", "keep-alive", "transfer-encoding", "content-length"}


def lexical(tag: str) -> tuple[str, str]:
    """The spec's order: case-insensitive, ties broken by the exact bytes."""
    return tag.lower(), tag


class PagingHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    registry: tuple[str, int] = ("127.0.0.1", 5000)
    storage: Path | None = None  # the registry's root directory: tag lists then carry the manifest map

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
        if found := TAGS.fullmatch(path):
            self._tags(found["name"], params)
        elif found := REFERRERS.fullmatch(path):
            self._referrers(found["name"], f"{found['algorithm']}:{found['encoded']}", params)
        else:
            self._proxy()

    def do_HEAD(self) -> None:
        self._proxy()

    # -- talking to the registry ----------------------------------------------------

    def _registry(self, method: str, target: str, headers: dict[str, str]) -> tuple[int, list[tuple[str, str]], bytes]:
        connection = http.client.HTTPConnection(*self.registry, timeout=30)
        try:
            connection.request(method, target, headers=headers)
            response = connection.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            connection.close()

    def _send(self, status: int, headers: list[tuple[str, str]], body: bytes, length: int | None = None) -> None:
        self.send_response(status)
        for name, value in headers:
            if name.lower() not in NOT_FORWARDED:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _proxy(self) -> None:
        # Clients send several Accept lines (one per manifest type): keep them all.
        headers = {name: ", ".join(self.headers.get_all(name)) for name in ("Accept", "Range") if name in self.headers}
        status, response_headers, body = self._registry(self.command, self.path, headers)
        length = next((int(v) for k, v in response_headers if k.lower() == "content-length"), len(body))
        self._send(status, response_headers, body, length if self.command == "HEAD" else None)

    def _json(self, value: object, content_type: str, link: str | None, extra: list[tuple[str, str]]) -> None:
        headers = [("Content-Type", content_type), *extra]
        if link is not None:
            headers.append(("Link", f'<{link}>; rel="next"'))
        self._send(200, headers, json.dumps(value).encode())

    # -- the two paged lists ------------------------------------------------------------

    def _tags(self, name: str, params: dict[str, str]) -> None:
        status, headers, body = self._registry("GET", f"/v2/{name}/tags/list", {})
        if status != 200:
            self._send(status, headers, body)
            return
        try:
            size = int(params.get("n", PAGE))
        except ValueError:
            size = -1
        if size < 0:
            self._send(400, [("Content-Type", "application/json")],
                       b'{"errors":[{"code":"UNSUPPORTED","message":"bad n"}]}')
            return
        tags = sorted(json.loads(body)["tags"] or [], key=lexical)
        if "last" in params:
            tags = [t for t in tags if lexical(t) > lexical(params["last"])]
        page = tags[:size]
        link = None
        if size and len(tags) > size:
            link = f"/v2/{name}/tags/list?n={size}&last={quote(page[-1], safe='')}"
        listing: dict[str, object] = {"name": name, "tags": page}
        if self.storage is not None:
            listing["manifest"] = self._manifest_map(name)
        self._json(listing, "application/json", link, [])

    def _manifest_map(self, name: str) -> dict[str, dict[str, object]]:
        """Every manifest of `name`, tagged or not, as Google's registries list them."""
        assert self.storage is not None
        manifests = self.storage / "docker" / "registry" / "v2" / "repositories" / name / "_manifests"
        tags: dict[str, list[str]] = {}
        for link in sorted((manifests / "tags").glob("*/current/link")):
            tags.setdefault(link.read_text().strip(), []).append(link.parent.parent.name)
        table = {}
        for link in sorted((manifests / "revisions").glob("*/*/link")):
            digest = link.read_text().strip()
            status, headers, body = self._registry("GET", f"/v2/{name}/manifests/{digest}", {"Accept": MANIFEST_TYPES})
            if status != 200:  # deleted since
                continue
            media_type = next(v for k, v in headers if k.lower() == "content-type")
            document = json.loads(body)
            parts = [document.get("config") or {}, *document.get("layers", [])]
            uploaded = str(int(link.stat().st_mtime * 1000))
            table[digest] = {
                "imageSizeBytes": str(sum(int(part.get("size", 0)) for part in parts)), "layerId": "",
                "mediaType": media_type, "tag": sorted(tags.get(digest, []), key=lexical),
                "timeCreatedMs": uploaded, "timeUploadedMs": uploaded,
            }
        return table

    def _referrers(self, name: str, digest: str, params: dict[str, str]) -> None:
        schema_tag = digest.replace(":", "-")
        status, _, body = self._registry("GET", f"/v2/{name}/manifests/{schema_tag}", {"Accept": OCI_INDEX})
        descriptors = json.loads(body).get("manifests", []) if status == 200 else []
        extra = []
        if "artifactType" in params:
            descriptors = [d for d in descriptors if d.get("artifactType") == params["artifactType"]]
            extra.append(("OCI-Filters-Applied", "artifactType"))
        if "last" in params:
            seen = [d["digest"] for d in descriptors]
            start = seen.index(params["last"]) + 1 if params["last"] in seen else len(seen)
            descriptors = descriptors[start:]
        page = descriptors[:PAGE]
        link = None
        if len(descriptors) > PAGE:
            query = {k: v for k, v in params.items() if k == "artifactType"}
            query["last"] = page[-1]["digest"]
            link = f"/v2/{name}/referrers/{digest}?" + "&".join(f"{k}={quote(v, safe='')}" for k, v in query.items())
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": page}
        self._json(index, OCI_INDEX, link, extra)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        sys.stderr.write(f'{self.address_string()} - - "{self.requestline}" {args[1] if len(args) > 1 else "-"}\n')
        sys.stderr.flush()


def main() -> None:
    registry_url, port = sys.argv[1], int(sys.argv[2])
    parts = urlsplit(registry_url)
    PagingHandler.registry = (parts.hostname or "127.0.0.1", parts.port or 80)
    if len(sys.argv) > 3:
        PagingHandler.storage = Path(sys.argv[3])
    server = ThreadingHTTPServer(("127.0.0.1", port), PagingHandler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
