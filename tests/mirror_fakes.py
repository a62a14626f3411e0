"""Fakes for the mirror tool's tests: a small OCI registry and an S3 server in-process.

`FakeRegistry` is an aiohttp app serving the read side of the distribution
API from memory: tag lists paginated with `Link` headers, manifests (HEAD
and GET, with `Docker-Content-Digest`), blobs. With `manifest_map` set, tag
lists carry the `manifest` map of Google's registries (every manifest of the
repository, tagged or not): the whole map on every page (`WHOLE_MAP`), or
each page only the entries of its own tags and the last page the untagged
ones (`PAGED_MAP`). Tests make it misbehave on
purpose: serve wrong bytes for a digest (`corrupt`), answer a path with a
scripted series of statuses first (`script`, e.g. 429 with Retry-After),
or demand an anonymous bearer token (`require_token`). Every request is
recorded with its time, so tests can count what the mirror asked for.

`moto_s3` runs moto's real S3 HTTP server in a thread on a free loopback
port; the mirror talks to it through boto3 as to any S3-compatible store.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def pseudo_random(size: int, seed: str) -> bytes:
    """Deterministic incompressible bytes (fast: SHAKE stream)."""
    return hashlib.shake_256(seed.encode()).digest(size)


@dataclass
class FakeImage:
    """A single-platform image: its manifest bytes and blobs."""

    manifest: bytes
    blobs: dict[str, bytes]
    media_type: str = OCI_MANIFEST

    @property
    def digest(self) -> str:
        return digest_of(self.manifest)


def make_image(name: str, layer_sizes: tuple[int, ...] = (3000, 5000),
               media_type: str = OCI_MANIFEST) -> FakeImage:
    config = json.dumps({"architecture": "amd64", "os": "linux", "name": name}).encode()
    layers = [pseudo_random(size, f"{name}/{i}") for i, size in enumerate(layer_sizes)]
    layer_type = OCI_LAYER if media_type == OCI_MANIFEST else "application/vnd.docker.image.rootfs.diff.tar.gzip"
    config_type = OCI_CONFIG if media_type == OCI_MANIFEST else "application/vnd.docker.container.image.v1+json"
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {"mediaType": config_type, "digest": digest_of(config), "size": len(config)},
        "layers": [{"mediaType": layer_type, "digest": digest_of(d), "size": len(d)} for d in layers],
    }).encode()
    return FakeImage(manifest, {digest_of(b): b for b in [config, *layers]}, media_type)


WHOLE_MAP = "whole"
PAGED_MAP = "paged"


def make_index(children: list[FakeImage]) -> bytes:
    """An OCI index of `children` (which the registry must also hold, by digest)."""
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": c.media_type, "digest": c.digest, "size": len(c.manifest)} for c in children
    ]}).encode()


@dataclass
class LoggedRequest:
    method: str
    path: str
    at: float
    status: int = 0


@dataclass
class FakeRegistry:
    """An in-memory OCI registry (see the module docstring)."""

    page_size: int = 1000
    tags: dict[str, dict[str, str]] = field(default_factory=dict)  # repo -> tag -> digest
    untagged: dict[str, list[str]] = field(default_factory=dict)  # repo -> digests no tag points at
    manifest_map: str = ""  # "", WHOLE_MAP or PAGED_MAP
    raw_map: object = None  # served as the map instead, as it is (a malformed map)
    map_extra: dict[str, object] = field(default_factory=dict)  # entries added to the map (malformed ones)
    manifests: dict[str, tuple[bytes, str]] = field(default_factory=dict)  # digest -> (body, type)
    blobs: dict[str, bytes] = field(default_factory=dict)
    corrupt: dict[str, bytes] = field(default_factory=dict)  # digest -> bytes served instead
    script: dict[str, list[tuple[int, dict[str, str]]]] = field(default_factory=dict)
    require_token: bool = False
    chunk_delay: float = 0.0  # seconds between 64 KiB chunks of a blob body
    log: list[LoggedRequest] = field(default_factory=list)
    url: str = ""

    # -- content -----------------------------------------------------------------

    def add_image(self, repository: str, tag: str, image: FakeImage) -> None:
        self.manifests[image.digest] = (image.manifest, image.media_type)
        self.blobs.update(image.blobs)
        self.tags.setdefault(repository, {})[tag] = image.digest

    def add_manifest(self, repository: str, tag: str, body: bytes, media_type: str) -> str:
        digest = digest_of(body)
        self.manifests[digest] = (body, media_type)
        self.tags.setdefault(repository, {})[tag] = digest
        return digest

    def add_untagged(self, repository: str, body: bytes, media_type: str, blobs: dict[str, bytes]) -> str:
        """A manifest in `repository` that no tag points at (pushed by digest, or its tag moved)."""
        digest = digest_of(body)
        self.manifests[digest] = (body, media_type)
        self.blobs.update(blobs)
        self.tags.setdefault(repository, {})
        self.untagged.setdefault(repository, []).append(digest)
        return digest

    def map_entries(self, repository: str, tags: list[str] | None, untagged: bool) -> dict[str, object]:
        """The `manifest` map as Google's registries write it, for `tags` (None: all) and the untagged."""
        by_digest: dict[str, list[str]] = {}
        for tag, digest in sorted(self.tags.get(repository, {}).items()):
            if tags is None or tag in tags:
                by_digest.setdefault(digest, []).append(tag)
        if untagged:
            for digest in self.untagged.get(repository, []):
                by_digest.setdefault(digest, [])
        return {digest: {
            "imageSizeBytes": str(len(self.manifests[digest][0])), "layerId": "",
            "mediaType": self.manifests[digest][1], "tag": names,
            "timeCreatedMs": "1700000000000", "timeUploadedMs": "1700000000000",
        } for digest, names in by_digest.items()}

    def count(self, method: str, fragment: str) -> int:
        return sum(1 for r in self.log if r.method == method and fragment in r.path)

    # -- the HTTP side ---------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/token", self._token)
        app.router.add_route("*", "/v2/{tail:.*}", self._handle)
        return app

    async def _token(self, request: web.Request) -> web.Response:
        self.log.append(LoggedRequest(request.method, request.path, time.monotonic(), 200))
        return web.json_response({"token": "fake-token"})

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        entry = LoggedRequest(request.method, request.path, time.monotonic())
        self.log.append(entry)
        response = await self._answer(request)
        entry.status = response.status
        return response

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        scripted = self.script.get(request.path)
        if scripted:
            status, headers = scripted.pop(0)
            return web.Response(status=status, headers=headers)
        if self.require_token and request.headers.get("Authorization") != "Bearer fake-token":
            challenge = f'Bearer realm="{self.url}/token",service="fake",scope="repository:x:pull"'
            return web.Response(status=401, headers={"WWW-Authenticate": challenge})
        path = request.path
        if path == "/v2/":
            return web.json_response({})
        if path == "/v2/_catalog":
            return self._page(request, "/v2/_catalog", "repositories", sorted(self.tags), {})
        if path.endswith("/tags/list"):
            return self._tag_page(request, path[len("/v2/"):-len("/tags/list")])
        if "/manifests/" in path:
            repository, reference = path[len("/v2/"):].split("/manifests/", 1)
            digest = self.tags.get(repository, {}).get(reference, reference)
            if digest not in self.manifests:
                return web.Response(status=404)
            body, media_type = self.manifests[digest]
            headers = {"Docker-Content-Digest": digest, "Content-Type": media_type}
            if request.method == "HEAD":
                return web.Response(headers={**headers, "Content-Length": str(len(body))})
            return web.Response(body=body, headers=headers)
        if "/blobs/" in path:
            digest = path.rsplit("/blobs/", 1)[1]
            if digest not in self.blobs:
                return web.Response(status=404)
            return await self._blob(request, self.corrupt.get(digest, self.blobs[digest]))
        return web.Response(status=404)

    async def _blob(self, request: web.Request, data: bytes) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = len(data)
        await response.prepare(request)
        for start in range(0, len(data), 65536):
            if self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
            await response.write(data[start:start + 65536])
        await response.write_eof()
        return response

    def _tag_page(self, request: web.Request, repository: str) -> web.Response:
        if repository not in self.tags:
            return web.json_response({"errors": [{"code": "NAME_UNKNOWN"}]}, status=404)
        return self._page(request, request.path, "tags", sorted(self.tags[repository]), {"name": repository},
                          repository if self.manifest_map else None)

    def _page(self, request: web.Request, path: str, key: str, names: list[str],
              extra: dict[str, object], mapped: str | None = None) -> web.Response:
        """One page of `names` after `?last=`, with a `Link` to the next one (and `mapped`'s map)."""
        size = min(int(request.query.get("n", self.page_size)), self.page_size)
        last = request.query.get("last")
        if last:
            names = [n for n in names if n > last]
        page, rest = names[:size], names[size:]
        headers = {}
        if rest:
            headers["Link"] = f'<{path}?n={size}&last={page[-1]}>; rel="next"'
        if mapped is not None:
            whole = self.manifest_map == WHOLE_MAP
            table = {**self.map_entries(mapped, None if whole else page, whole or not rest), **self.map_extra}
            extra = {**extra, "manifest": table if self.raw_map is None else self.raw_map}
        return web.json_response({**extra, key: page}, headers=headers)


@contextlib.contextmanager
def serve_in_thread(registry: FakeRegistry) -> Iterator[FakeRegistry]:
    """Serve `registry` on a free loopback port from a thread with its own loop.

    For tests that run the mirror as a separate process.
    """
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(registry.app(), access_log=None)

    async def start() -> None:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        registry.url = f"http://127.0.0.1:{port}"

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield registry
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@dataclass
class MotoS3:
    """moto's S3 server in a thread: its URL and a set-up client."""

    url: str
    client: Any

    def bucket(self, name: str) -> str:
        """Create bucket `name`; its path-style base URL."""
        self.client.create_bucket(Bucket=name)
        return f"{self.url}/{name}"

    def keys(self, bucket: str, prefix: str = "") -> set[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return {item["Key"] for page in pages for item in page.get("Contents", ())}

    def read(self, bucket: str, key: str) -> bytes:
        return bytes(self.client.get_object(Bucket=bucket, Key=key)["Body"].read())


# Credentials for the fakes only; set in the environment so the mirror's
# standard AWS chain finds them, as it would real ones.
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
}


@contextlib.contextmanager
def moto_s3() -> Iterator[MotoS3]:
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in FAKE_AWS_ENV}
    os.environ.update(FAKE_AWS_ENV)
    try:
        client = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
        yield MotoS3(url, client)
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
