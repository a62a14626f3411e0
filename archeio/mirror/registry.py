"""A small, polite OCI distribution client: the read side of the mirror.

It lists repositories and tags (following `Link` pagination), resolves tags
to manifest digests with HEAD, fetches manifests (verifying their digest)
and opens blob downloads as streams. Every request passes the source's rate
and concurrency limits and is retried with backoff on 429, 5xx and broken
connections, honouring `Retry-After`. Anonymous bearer tokens are fetched
when a registry asks for them (public registries such as Artifact Registry,
ghcr.io or Docker Hub do).

Google's registries (Artifact Registry, Container Registry) add to a tag
list a `manifest` map holding every manifest of the repository, tagged or
not: `{"<digest>": {"imageSizeBytes": "...", "layerId": "", "mediaType":
"...", "tag": ["v1", ...], "timeCreatedMs": "...", "timeUploadedMs":
"..."}}` (the numbers are strings on GCR; Artifact Registry sends
`timeUploadedMs` as a number). `listing` reads it where present: a tag it
names needs no HEAD, and a manifest with no tag (pinned by digest, or left
behind when its tag moved) is listed by its digest, so it is mirrored too.
Only the keys and `tag` are used; the other fields are not trusted.

`parse_manifest` is pure: it sorts a manifest into an image (config and
layer blobs), an index (child manifests) or something we do not mirror
(schema 1, unknown media types), for the caller to report.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from urllib.parse import quote, urljoin, urlsplit

import aiohttp

from .ratelimit import RETRY_STATUSES, Backoff, SourceLimits, retry_after_seconds

log = logging.getLogger("archeio.mirror")

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_ARTIFACT = "application/vnd.oci.artifact.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

IMAGE_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST, OCI_ARTIFACT})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
SCHEMA1_TYPES = frozenset({DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED})

# Schema 1 is asked for last so that a registry able to convert answers with
# schema 2, and one holding only schema 1 says so instead of answering 404.
MANIFEST_ACCEPT = ", ".join((
    OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST, OCI_ARTIFACT,
    f"{DOCKER_SCHEMA1_SIGNED};q=0.5", f"{DOCKER_SCHEMA1};q=0.5",
))

# Layers that clients fetch from the URLs in their descriptor, never from the
# registry (Windows base layers): the redirect server never sees them.
FOREIGN_LAYER_TYPES = frozenset({
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
})

# Digests we can verify; anything else is refused before it becomes a key.
_DIGEST = re.compile(r"^(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})$")
# The OCI distribution spec's repository name and tag grammars.
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_LINK_NEXT = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?')
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


class RegistryError(Exception):
    """A request the source registry did not answer usefully."""


class NotFound(RegistryError):
    """The registry answered 404 (or an equivalent error code)."""


class DigestMismatch(RegistryError):
    """Bytes whose digest or size differ from what the manifest promised."""


def is_digest(value: str) -> bool:
    return bool(_DIGEST.match(value))


def new_hasher(digest: str) -> hashlib._Hash:
    """A hash object of the digest's algorithm."""
    return hashlib.new(digest.split(":", 1)[0])


def check_digest(digest: str) -> str:
    if not is_digest(digest):
        raise RegistryError(f"unsupported or malformed digest {digest[:80]!r}")
    return digest


@dataclass(frozen=True)
class Listed:
    """One entry of a repository's listing: a tag, or the digest of an untagged manifest.

    `digest` is the manifest the entry stands for when the registry said so
    (its `manifest` map), else None and a tag is resolved with a HEAD. An
    untagged manifest is listed with its digest as both.
    """

    reference: str
    digest: str | None = None

    @property
    def untagged(self) -> bool:
        return self.reference == self.digest


@dataclass(frozen=True)
class ImageRef:
    """What to mirror from one repository: every tag, one tag, or one digest."""

    repository: str
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        if self.digest:
            return f"{self.repository}@{self.digest}"
        return f"{self.repository}:{self.tag}" if self.tag else self.repository


def parse_image_ref(text: str) -> ImageRef:
    """`repo`, `repo:tag` or `repo@sha256:...` (the name relative to the registry)."""
    text = text.strip()
    repository, tag, digest = text, None, None
    if "@" in text:
        repository, digest = text.split("@", 1)
        if not is_digest(digest):
            raise ValueError(f"{text!r}: bad digest (sha256:<64 hex> or sha512:<128 hex>)")
    elif ":" in text.rsplit("/", 1)[-1]:
        repository, tag = text.rsplit(":", 1)
        if not _TAG.match(tag):
            raise ValueError(f"{text!r}: bad tag {tag!r}")
    if not _REPOSITORY.match(repository):
        raise ValueError(f"{text!r}: not a repository name (lower case, digits and . _ - /)")
    return ImageRef(repository, tag, digest)


@dataclass(frozen=True)
class Descriptor:
    """One content reference from a manifest."""

    media_type: str
    digest: str
    size: int
    urls: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, data: object) -> Descriptor:
        if not isinstance(data, dict):
            raise RegistryError("descriptor is not an object")
        digest, size = data.get("digest"), data.get("size")
        if not isinstance(digest, str) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise RegistryError(f"descriptor without a valid digest and size: {str(data)[:120]}")
        urls = data.get("urls") or ()
        return cls(str(data.get("mediaType", "")), check_digest(digest), size,
                   tuple(u for u in urls if isinstance(u, str)))

    @property
    def is_foreign(self) -> bool:
        return self.media_type in FOREIGN_LAYER_TYPES


IMAGE = "image"
INDEX = "index"
SCHEMA1 = "schema1"
UNKNOWN = "unknown"


@dataclass(frozen=True)
class Manifest:
    """What a manifest asks the mirror to do."""

    kind: str  # IMAGE, INDEX, SCHEMA1 or UNKNOWN
    media_type: str
    blobs: tuple[Descriptor, ...] = ()  # config and layers of an image
    children: tuple[Descriptor, ...] = ()  # manifests of an index
    foreign: tuple[Descriptor, ...] = field(default=())  # layers served from elsewhere


def parse_manifest(body: bytes, content_type: str | None) -> Manifest:
    """Sort a manifest by its media type (header first, then its own field)."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RegistryError(f"manifest is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise RegistryError("manifest is not a JSON object")
    header_type = (content_type or "").split(";", 1)[0].strip().lower()
    media_type = header_type if header_type not in ("", "application/json", "text/plain") else ""
    media_type = media_type or str(doc.get("mediaType") or "")
    if not media_type:
        # OCI allows leaving mediaType out; the shape tells what it is.
        if doc.get("schemaVersion") == 1:
            media_type = DOCKER_SCHEMA1
        elif "manifests" in doc:
            media_type = OCI_INDEX
        elif "layers" in doc or "config" in doc:
            media_type = OCI_MANIFEST
    if media_type in SCHEMA1_TYPES:
        return Manifest(SCHEMA1, media_type)
    if media_type in INDEX_TYPES:
        children = doc.get("manifests")
        if not isinstance(children, list):
            raise RegistryError("index without a manifests list")
        return Manifest(INDEX, media_type, children=tuple(Descriptor.from_json(c) for c in children))
    if media_type in IMAGE_TYPES:
        parts: list[object] = []
        if media_type == OCI_ARTIFACT:
            parts.extend(doc.get("blobs") or [])
        else:
            if "config" not in doc:
                raise RegistryError("image manifest without a config")
            parts.append(doc["config"])
            layers = doc.get("layers") or []
            if not isinstance(layers, list):
                raise RegistryError("image manifest layers is not a list")
            parts.extend(layers)
        descriptors = [Descriptor.from_json(p) for p in parts]
        return Manifest(
            IMAGE, media_type,
            blobs=tuple(d for d in descriptors if not d.is_foreign),
            foreign=tuple(d for d in descriptors if d.is_foreign),
        )
    return Manifest(UNKNOWN, media_type or "(none)")


def _listed(page: dict[str, object], key: str) -> list[object]:
    """A page's list of names; `null` (a repository without tags) or garbage is none."""
    value = page.get(key)
    return value if isinstance(value, list) else []


def _manifest_map(page: dict[str, object], repository: str) -> list[tuple[str, tuple[str, ...]]]:
    """(digest, tags) of each entry of a page's `manifest` map; none when it has no map.

    A malformed entry is skipped with a warning; a `tag` that is not a list
    of strings counts as no tag, so the manifest is still mirrored, by digest.
    """
    table = page.get("manifest")
    if table is None:
        return []
    if not isinstance(table, dict):
        log.warning("%s: ignoring a manifest map that is not an object", repository)
        return []
    entries = []
    for digest, entry in table.items():
        if not is_digest(digest) or not isinstance(entry, dict):
            log.warning("%s: ignoring malformed manifest map entry %r", repository, str(digest)[:140])
            continue
        tags = entry.get("tag")
        valid = tuple(t for t in tags if isinstance(t, str) and _TAG.match(t)) if isinstance(tags, list) else ()
        entries.append((digest, valid))
    return entries


def _bearer_challenge(header: str) -> dict[str, str] | None:
    scheme, _, params = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return dict(_CHALLENGE_PARAM.findall(params))


class RegistryClient:
    """Reads one source registry through its OCI distribution API."""

    def __init__(self, base_url: str, limits: SourceLimits, backoff: Backoff | None = None,
                 page_size: int = 1000, connect_timeout: float = 30.0, read_timeout: float = 120.0) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"source registry {base_url!r}: must be an http(s) URL")
        self.base_url = f"{parts.scheme}://{parts.netloc}"
        self.limits = limits
        self.backoff = backoff or Backoff()
        self.page_size = page_size
        self.requests = 0  # every HTTP request sent to the registry or its token service
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self._session: aiohttp.ClientSession | None = None
        self._tokens: dict[str, str] = {}  # scope -> bearer token

    async def __aenter__(self) -> RegistryClient:
        self._session = aiohttp.ClientSession(
            timeout=self._timeout, auto_decompress=False,
            headers={"User-Agent": "archeio-mirror"},
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- the API -----------------------------------------------------------

    async def repositories(self) -> AsyncIterator[str]:
        """Every repository of the catalog (`/v2/_catalog`, paginated)."""
        async for page in self._pages("/v2/_catalog", scope="registry:catalog:*"):
            for name in _listed(page, "repositories"):
                if isinstance(name, str) and _REPOSITORY.match(name):
                    yield name

    async def listing(self, repository: str) -> AsyncIterator[Listed]:
        """Every tag of a repository (`/v2/<name>/tags/list`, paginated), then its untagged manifests.

        Where the pages carry a `manifest` map (Google's registries), each
        tag comes with the digest the map gives it, and every manifest the
        map lists without a tag follows its page's tags, once, by digest.
        The map may come whole on every page or in parts: both are read.
        """
        path = f"/v2/{repository}/tags/list"
        tagged: dict[str, str] = {}  # tag -> digest, from the map
        untagged: set[str] = set()
        async for page in self._pages(path, scope=f"repository:{repository}:pull"):
            found: list[str] = []
            for digest, tags in _manifest_map(page, repository):
                for tag in tags:
                    tagged[tag] = digest
                if not tags and digest not in untagged:
                    untagged.add(digest)
                    found.append(digest)
            for tag in _listed(page, "tags"):
                if isinstance(tag, str) and _TAG.match(tag):
                    yield Listed(tag, tagged.get(tag))
                else:
                    log.warning("%s: ignoring malformed tag %r", repository, str(tag)[:140])
            for digest in found:
                yield Listed(digest, digest)

    async def resolve(self, repository: str, reference: str) -> str:
        """The digest a tag points at, from a HEAD (no manifest body fetched)."""
        url = f"/v2/{repository}/manifests/{quote(reference, safe=':')}"
        async with self._exchange("HEAD", url, repository, {"Accept": MANIFEST_ACCEPT}) as resp:
            self._raise_for_status(resp, f"{repository}:{reference}")
            digest = resp.headers.get("Docker-Content-Digest", "")
        if is_digest(digest):
            return digest
        # A registry that does not say: hash the manifest ourselves.
        _, _, digest = await self.manifest(repository, reference)
        return digest

    async def manifest(self, repository: str, reference: str) -> tuple[bytes, str, str]:
        """(body, content type, digest) of a manifest; its digest is verified."""
        url = f"/v2/{repository}/manifests/{quote(reference, safe=':')}"
        async with self._exchange("GET", url, repository, {"Accept": MANIFEST_ACCEPT}) as resp:
            self._raise_for_status(resp, f"{repository}:{reference}")
            # Manifests are small by spec (registries cap them at 4 MiB).
            body = await resp.content.read(4 * 1024 * 1024 + 1)
            if len(body) > 4 * 1024 * 1024:
                raise RegistryError(f"{repository}:{reference}: manifest larger than 4 MiB")
            content_type = resp.headers.get("Content-Type", "")
            header_digest = resp.headers.get("Docker-Content-Digest", "")
        expected = reference if is_digest(reference) else header_digest
        algorithm = expected.split(":", 1)[0] if is_digest(expected) else "sha256"
        digest = f"{algorithm}:{hashlib.new(algorithm, body).hexdigest()}"
        if is_digest(expected) and digest != expected:
            raise DigestMismatch(f"{repository}@{expected}: manifest bytes hash to {digest}")
        return body, content_type, digest

    @asynccontextmanager
    async def blob(self, repository: str, digest: str) -> AsyncIterator[aiohttp.ClientResponse]:
        """An open blob download; the source slot is held until the block ends."""
        # identity: a blob's digest is of its stored bytes; a store that
        # gzips the response on the fly would hand us other bytes.
        headers = {"Accept-Encoding": "identity"}
        async with self._exchange("GET", f"/v2/{repository}/blobs/{digest}", repository, headers) as resp:
            self._raise_for_status(resp, f"{repository}@{digest}")
            yield resp

    # -- plumbing ------------------------------------------------------------

    def _raise_for_status(self, resp: aiohttp.ClientResponse, what: str) -> None:
        if resp.status == 404:
            raise NotFound(f"{what}: not found (404)")
        if resp.status != 200:
            raise RegistryError(f"{what}: registry answered {resp.status} {resp.reason or ''}".rstrip())

    async def _pages(self, path: str, scope: str) -> AsyncIterator[dict[str, object]]:
        url: str | None = f"{path}?n={self.page_size}"
        seen: set[str] = set()
        while url is not None:
            seen.add(url)
            async with self._exchange("GET", url, scope, {"Accept": "application/json"}) as resp:
                self._raise_for_status(resp, path)
                try:
                    page = await resp.json(content_type=None)
                except (ValueError, aiohttp.ContentTypeError) as exc:
                    raise RegistryError(f"{path}: answer is not JSON: {exc}") from None
                url = self._next_page(resp.headers.get("Link", ""), path)
            if not isinstance(page, dict):
                raise RegistryError(f"{path}: answer is not a JSON object")
            yield page
            if url in seen:  # a registry that links a page to itself
                break

    def _next_page(self, link: str, path: str) -> str | None:
        match = _LINK_NEXT.search(link)
        if not match:
            return None
        link_target: str = match.group(1)
        target = urlsplit(urljoin(self.base_url + path, link_target))
        if f"{target.scheme}://{target.netloc}" != self.base_url:
            # Only ever follow pagination on the registry we were given.
            raise RegistryError(f"{path}: pagination link leaves the registry: {link_target[:200]!r}")
        return target.path + (f"?{target.query}" if target.query else "")

    @asynccontextmanager
    async def _exchange(self, method: str, path: str, scope: str,
                        headers: dict[str, str]) -> AsyncIterator[aiohttp.ClientResponse]:
        """One request with limits, bearer auth and retries; yields the final response.

        `scope` is a repository name or a full token scope. The in-flight slot
        is held for the whole block, so a streamed body counts as in flight.
        """
        assert self._session is not None, "use `async with RegistryClient(...)`"
        if ":" not in scope:
            scope = f"repository:{scope}:pull"
        url = self.base_url + path
        tried_token = False
        attempt = 0
        async with self.limits.in_flight:
            while True:
                attempt += 1
                await self.limits.rate.acquire()
                self.requests += 1
                request_headers = dict(headers)
                token = self._tokens.get(scope)
                if token:
                    request_headers["Authorization"] = f"Bearer {token}"
                try:
                    resp = await self._session.request(method, url, headers=request_headers)
                except (TimeoutError, aiohttp.ClientError) as exc:
                    if attempt >= self.backoff.attempts:
                        raise RegistryError(f"{method} {path}: {type(exc).__name__}: {exc}") from None
                    await asyncio.sleep(self.backoff.delay(attempt))
                    continue
                if resp.status == 401 and not tried_token:
                    challenge = _bearer_challenge(resp.headers.get("WWW-Authenticate", ""))
                    resp.release()
                    if challenge is None or "realm" not in challenge:
                        raise RegistryError(f"{method} {path}: registry wants credentials we do not have")
                    tried_token = True
                    self._tokens[scope] = await self._fetch_token(challenge, scope)
                    attempt -= 1  # the token dance is not a failure
                    continue
                if resp.status in RETRY_STATUSES and attempt < self.backoff.attempts:
                    wait = self.backoff.delay(attempt, retry_after_seconds(resp.headers.get("Retry-After")))
                    log.info("%s %s: %s, retrying in %.1f s", method, path, resp.status, wait)
                    resp.release()
                    await asyncio.sleep(wait)
                    continue
                try:
                    yield resp
                finally:
                    resp.release()
                return

    async def _fetch_token(self, challenge: dict[str, str], scope: str) -> str:
        """An anonymous bearer token from the realm the registry named."""
        assert self._session is not None
        realm = challenge["realm"]
        if urlsplit(realm).scheme not in ("http", "https"):
            raise RegistryError(f"token realm {realm[:200]!r} is not an http(s) URL")
        params = {"scope": challenge.get("scope") or scope}
        if "service" in challenge:
            params["service"] = challenge["service"]
        await self.limits.rate.acquire()
        self.requests += 1
        try:
            async with self._session.get(realm, params=params) as resp:
                if resp.status != 200:
                    raise RegistryError(f"token service answered {resp.status}")
                doc = await resp.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            raise RegistryError(f"token service: {type(exc).__name__}: {exc}") from None
        token = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
        if not isinstance(token, str) or not token:
            raise RegistryError("token service answered without a token")
        return token
