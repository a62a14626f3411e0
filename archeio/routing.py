"""The routing decision: what a request is, and where it is sent.

This module is pure: no I/O, no aiohttp. `Router.classify` turns a method and
request target into either a `LocalAnswer` (something we answer ourselves:
200 on /v2/, 404, 405, 400) or a `Route` (a registry request to redirect);
`mirror_for`, `upstream_location` and `mirror_decision` give the pieces of
a `Decision`. The request flow (app.py) puts them together, and the tables
of tests/test_routing.py go through it.

Why so strict about paths: a redirect must only ever point at a configured
host under the configured path. Everything we copy from the request into a
`Location` is checked against the OCI grammar first (repository names,
tags, digests), so nothing in it can be a dot segment, an empty segment, a
scheme, an `@`, a backslash or a control character. Anything else is
answered here with an OCI error body instead of a redirect: 400 for a
malformed name or digest, 404 `MANIFEST_UNKNOWN` for a manifest reference
that is neither a tag nor a digest (no such manifest can exist). The whole
table, with the spec's words, is in docs/request-handling.md.

With the signature fallback on (`Settings.signature_fallback`, and the
flow's router made with `fallback`), a manifest by a checkable digest is a
`DigestRoute`: its answer depends on whether the
regional upstream holds it (app.py's `FallbackFlow`), and `fallback_location`
gives the same path on the signature upstream.

Names that already start with the upstream path (`<prefix>/<name>`) go to
that same path instead of being prefixed twice: registries page tag lists
and referrers with a `Link` to `/v2/<prefix>/<name>/...`, and clients send
that path back to us.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, NamedTuple
from urllib.parse import quote, unquote_to_bytes

from iprange import GCP, Placement

from .config import Settings

# OCI distribution spec, "Pulling manifests": repository name components
# separated by '/', each lowercase alphanumerics joined by '.', '_', '__' or
# runs of '-'. Names longer than 255 characters are refused.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_NAME = rf"{_COMPONENT}(?:/{_COMPONENT})*"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}"
_DIGEST = r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+"

_ENDPOINT_RE = re.compile(
    rf"(?P<name>{_NAME})/(?:"
    rf"(?P<kind>blobs|manifests|referrers)/(?P<ref>[^/]*)"
    rf"|(?P<tags>tags/list))"
)
_NAME_RE = re.compile(_NAME)
_TAG_RE = re.compile(_TAG)
_DIGEST_RE = re.compile(_DIGEST)
# Digests whose encoding we can check: only these ever cause a HEAD.
_CHECKABLE_DIGEST_RE = re.compile(r"sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128}")
# The algorithms whose encoding the OCI image spec fixes: a digest of one of
# them that is not checkable above is malformed, never merely unknown.
_REGISTERED_ALGORITHMS = ("sha256:", "sha512:")
# cosign's signature and attestation tags: sha256-<hex>.sig / .att
_SIGNATURE_TAG_RE = re.compile(r"sha256-[a-f0-9]{64}\.(?:sig|att)")
# A query string that is already a correctly encoded URL query.
_CLEAN_QUERY_RE = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?]|%[0-9A-Fa-f]{2})*")
_QUERY_SAFE = "-._~!$&'()*+,;=:@/?"

MAX_NAME_LENGTH = 255
# Paths remembered with their classification. Real traffic repeats a small
# set of paths (popular images), so most requests skip the regular
# expressions; the table is emptied when full, which bounds its memory
# whatever an attacker sends.
KNOWN_PATHS = 20_000
# Longer paths are not remembered: no real pull path is that long (a name
# is at most 255 characters, a checkable digest 135), and remembering
# 20,000 paths near the 8 KB request-line limit would hold about 160 MB.
KNOWN_PATH_LENGTH = 512

# Route kinds, also the `kind` label of metrics and access logs.
BLOB = "blob"
MANIFEST = "manifest"
SIGNATURE = "signature"
REFERRERS = "referrers"
TAGS = "tags"
OTHER = "other"

# Decision backends, also the `decision` label.
MIRROR = "mirror"
UPSTREAM = "upstream"
SIGNATURE_UPSTREAM = "signature_upstream"
# Content by digest the regional upstream lacks, sent to the signature upstream.
SIGNATURE_FALLBACK = "signature_fallback"
LOCAL = "local"


class LocalAnswer(NamedTuple):
    """A response we give ourselves, as data: each HTTP engine renders it.

    `headers` are extra response headers (name, value) beyond Location,
    Content-Type and Content-Length; the engines add the wire-level ones
    (Date, Connection) themselves.
    """

    status: int
    body: bytes = b""
    location: str | None = None
    content_type: str | None = None
    code: str = ""  # the OCI error code, for logs
    headers: tuple[tuple[str, str], ...] = ()


class Decision(NamedTuple):
    """Where a registry request goes: always a 307 to `location`."""

    location: str
    backend: str


class Route(NamedTuple):
    """A well-formed registry request, to be redirected.

    `rest` is the path after `/v2/`, validated and safe to put in a URL;
    `digest` is set only for blob requests whose digest we can check (and,
    with the signature fallback, for manifests by such a digest: `DigestRoute`).
    `upstream` is the redirect target without the query, on `backend`.
    The rest is made once per route, because the router remembers routes
    by path and popular paths repeat: `plain` is the decision for a request
    without a query, `counted` the (kind, backend, status) key of its
    metric, and `answers` what the request flow counts it by (given by the
    flow: the router only hands it on, app.py).
    """

    kind: str
    rest: str
    digest: str | None
    upstream: str
    backend: str
    plain: Decision
    counted: tuple[str, str, int]
    answers: Any = None


class DigestRoute(Route):
    """A manifest by a checkable digest, with the signature fallback on.

    Its answer depends on whether the regional upstream holds it. A type of
    its own: the flow already tests whether a route is a plain `Route`, and
    that one test sends this one to its check (app.py's `FallbackFlow`), so
    no other request pays for the feature.
    """

    __slots__ = ()


def oci_error(status: int, code: str, message: str) -> LocalAnswer:
    """An answer with the OCI distribution error body."""
    body = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
    return LocalAnswer(status, body, content_type="application/json", code=code)


METHOD_NOT_ALLOWED = oci_error(405, "UNSUPPORTED", "only GET and HEAD are supported")._replace(
    headers=(("Allow", "GET, HEAD"),)
)
CATALOG = oci_error(404, "UNSUPPORTED", "the catalog API is not supported")
NOT_FOUND = oci_error(404, "NOT_FOUND", "no such path")
NAME_INVALID = oci_error(400, "NAME_INVALID", "invalid repository name or path")
# The spec: a reference "MUST be either (a) the digest of the manifest or
# (b) a tag", and a manifest that is not found MUST get a 404.
MANIFEST_UNKNOWN = oci_error(404, "MANIFEST_UNKNOWN", "manifest reference is neither a tag nor a digest")
DIGEST_INVALID = oci_error(400, "DIGEST_INVALID", "invalid digest")
DIGEST_ENCODING_INVALID = oci_error(
    400, "DIGEST_INVALID", "sha256 digests are 64 and sha512 digests 128 lower-case hex characters"
)
CLIENT_IP_INVALID = oci_error(400, "UNSUPPORTED", "cannot determine the client address")
# Returning 200 here keeps clients from asking for a token: the registry is
# anonymous, and auth happens (if ever) at the upstream.
V2_ROOT = LocalAnswer(
    200, b"{}", content_type="application/json",
    headers=(("Docker-Distribution-Api-Version", "registry/2.0"),),
)


def clean_query(query: str) -> str:
    """The query as a correctly percent-encoded string, existing escapes kept.

    `query` holds the raw bytes of the request as latin-1 characters, so
    each character re-encodes to the byte the client sent.
    """
    if _CLEAN_QUERY_RE.fullmatch(query):
        return query
    out: list[str] = []
    i = 0
    while i < len(query):
        char = query[i]
        if char == "%" and re.fullmatch(r"[0-9A-Fa-f]{2}", query[i + 1 : i + 3]):
            out.append(query[i : i + 3])
            i += 3
            continue
        out.append(quote(char, safe=_QUERY_SAFE, encoding="latin-1"))
        i += 1
    return "".join(out)


def decode_path(raw: str) -> str | None:
    """Percent-decode a request path as upstream matches it; None if not UTF-8."""
    if "%" not in raw:
        return raw
    try:
        return unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return None


class Router:
    """Classifies requests and decides redirects for one configuration."""

    def __init__(
        self, settings: Settings, answers: Callable[[tuple[str, str, int]], Any] | None = None,
        fallback: bool = False,
    ) -> None:
        """`answers(key)`: what routes of that counting key carry as `answers` (None without it);
        `fallback`: manifests by a checkable digest are `DigestRoute`s (the flow's choice: app.py)."""
        self.settings = settings
        self._answers = answers
        path = settings.upstream_registry_path
        # `<path>/`: a name starting with it is already an upstream name.
        self._path_prefix = path + "/" if path else ""
        self._upstream_root = settings.upstream_registry_endpoint + "/v2/"
        self._upstream_prefix = self._upstream_root + self._path_prefix
        signature = settings.signature_upstream_endpoint
        self._signature_root = signature + "/v2/" if signature else self._upstream_root
        self._signature_prefix = self._signature_root + self._path_prefix
        self._fallback = fallback
        self._upstream_length = len(settings.upstream_registry_endpoint)
        self._known: dict[str, LocalAnswer | Route] = {}
        # mirror -> digest -> the decision to send that blob there.
        self._to_mirror: dict[str, dict[str, Decision]] = {}
        self._info = LocalAnswer(307, location=settings.info_url)
        self._privacy = LocalAnswer(307, location=settings.privacy_url)
        self.default_mirror = settings.default_aws_base_url
        self._mirrors = settings.mirrors
        # Placement -> mirror base URL (None: Google Cloud, always upstream).
        # Filled lazily: placements are shared objects, so this stays small.
        self._mirror_by_placement: dict[Placement, str | None] = {}

    def classify(self, method: str, path: str) -> LocalAnswer | Route:
        """What a request is, from its method and (raw, undecoded) path."""
        if method != "GET" and method != "HEAD":
            return METHOD_NOT_ALLOWED
        known = self._known.get(path)
        if known is not None:
            return known
        if path.startswith("/v2/"):
            decoded = decode_path(path)
            answer = NAME_INVALID if decoded is None else self._classify_v2(decoded[4:])
            if len(path) <= KNOWN_PATH_LENGTH:
                if len(self._known) >= KNOWN_PATHS:
                    self._known.clear()
                self._known[path] = answer
            return answer
        if path == "/v2":
            return V2_ROOT
        if path == "/":
            return self._info
        if path == "/privacy" or path.startswith("/privacy/"):
            return self._privacy
        return NOT_FOUND

    def _classify_v2(self, rest: str) -> LocalAnswer | Route:
        if not rest:
            return V2_ROOT
        if rest == "_catalog":
            return CATALOG
        match = _ENDPOINT_RE.fullmatch(rest)
        if match is None:
            # Any other path under /v2/ goes upstream as upstream does, but
            # only if all of it reads as a repository name.
            if len(rest) <= MAX_NAME_LENGTH and _NAME_RE.fullmatch(rest):
                return self._route(OTHER, rest, rest)
            return NAME_INVALID
        if len(match["name"]) > MAX_NAME_LENGTH:
            return NAME_INVALID
        if match["tags"]:
            return self._route(TAGS, rest, match["name"])
        kind, ref = match["kind"], match["ref"]
        checkable = _CHECKABLE_DIGEST_RE.fullmatch(ref) is not None
        if not checkable and ref.startswith(_REGISTERED_ALGORITHMS):
            # sha256:totallywrong, upper-case hex, a wrong length: no
            # registry can hold it, and the upstream registry answers 500.
            return DIGEST_ENCODING_INVALID
        if kind == "manifests":
            if _SIGNATURE_TAG_RE.fullmatch(ref):
                return self._route(SIGNATURE, rest, match["name"])
            if checkable and self._fallback:
                return self._route(MANIFEST, rest, match["name"], ref)
            if checkable or _TAG_RE.fullmatch(ref) or _DIGEST_RE.fullmatch(ref):
                return self._route(MANIFEST, rest, match["name"])
            return MANIFEST_UNKNOWN
        if not checkable and not _DIGEST_RE.fullmatch(ref):
            return DIGEST_INVALID
        if kind == "referrers":
            return self._route(REFERRERS, rest, match["name"])
        return self._route(BLOB, rest, match["name"], ref if checkable else None)

    def _route(self, kind: str, rest: str, name: str, digest: str | None = None) -> Route:
        # Signatures live in their own registry when one is configured, and
        # so do the referrers that point at them.
        signature = kind in (SIGNATURE, REFERRERS) and self.settings.signature_upstream_endpoint
        # A name already under the upstream path came from a registry's
        # `Link` (the next page of a tag list or of referrers): it names the
        # upstream repository as it is. The name has a component after the
        # path (the grammar allows no empty one), so the target stays under
        # the path: the repository named exactly the path stays unreachable.
        if self._path_prefix and name.startswith(self._path_prefix):
            root = self._signature_root if signature else self._upstream_root
        else:
            root = self._signature_prefix if signature else self._upstream_prefix
        backend = SIGNATURE_UPSTREAM if signature else UPSTREAM
        upstream = root + rest
        key = (kind, backend, 307)
        made = DigestRoute if kind == MANIFEST and digest else Route
        return made(kind, rest, digest, upstream, backend, Decision(upstream, backend), key,
                    self._answers(key) if self._answers is not None else None)

    @staticmethod
    def upstream_location(route: Route, query: str) -> Decision:
        """The redirect for anything that is not a blob served by a mirror."""
        if query:
            return Decision(route.upstream + "?" + clean_query(query), route.backend)
        return route.plain

    def fallback_location(self, route: Route, query: str) -> Decision:
        """The redirect of content by digest the regional upstream lacks: the same path, query
        and all, on the signature upstream (which holds everything)."""
        location = self.settings.signature_upstream_endpoint + route.upstream[self._upstream_length:]
        if query:
            location += "?" + clean_query(query)
        return Decision(location, SIGNATURE_FALLBACK)

    def mirror_for(self, placement: Placement | None) -> str | None:
        """The mirror a client's blobs should come from; None: go upstream.

        Google Cloud clients always go upstream (Artifact Registry is in
        their cloud); clients with no regional mirror, and unknown clients,
        get the default (the CDN).
        """
        if placement is None:
            return self.default_mirror
        try:
            return self._mirror_by_placement[placement]
        except KeyError:
            pass
        if placement.cloud == GCP:
            mirror = None
        else:
            mirror = self._mirrors.mirror_url_for(placement.cloud, placement.region) or self.default_mirror
        self._mirror_by_placement[placement] = mirror
        return mirror

    @staticmethod
    def mirror_location(mirror: str, digest: str) -> Decision:
        """The redirect to a blob's copy in a mirror."""
        return Decision(mirror + "/containers/images/" + digest, MIRROR)

    def mirror_decision(self, route: Route, mirror: str) -> Decision:
        """The redirect of a blob route to `mirror`, the same object while remembered.

        Engines may cache what they render per decision: a blob asked for
        again from the same mirror gets the same decision (at most
        KNOWN_PATHS remembered per mirror, emptied when full).
        """
        digest = route.digest
        assert digest is not None
        by_digest = self._to_mirror.get(mirror)
        if by_digest is None:
            by_digest = self._to_mirror[mirror] = {}
        decision = by_digest.get(digest)
        if decision is None:
            if len(by_digest) >= KNOWN_PATHS:
                by_digest.clear()
            decision = by_digest[digest] = self.mirror_location(mirror, digest)
        return decision
