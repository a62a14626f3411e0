"""The mirror's registry side: manifest sorting, references, and the client
against a fake registry (pagination, retries, tokens, digest checks)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestServer

from archeio.mirror.ratelimit import Backoff, SourceLimits
from archeio.mirror.registry import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    DOCKER_SCHEMA1_SIGNED,
    IMAGE,
    INDEX,
    OCI_INDEX,
    OCI_MANIFEST,
    SCHEMA1,
    UNKNOWN,
    DigestMismatch,
    ImageRef,
    Listed,
    NotFound,
    RegistryClient,
    RegistryError,
    parse_image_ref,
    parse_manifest,
)

from .mirror_fakes import PAGED_MAP, WHOLE_MAP, FakeRegistry, digest_of, make_image

A = "sha256:" + "a" * 64
B = "sha256:" + "b" * 64
C = "sha256:" + "c" * 64


def descriptor(digest: str, size: int = 10, media_type: str = "application/octet-stream") -> dict[str, object]:
    return {"mediaType": media_type, "digest": digest, "size": size}


def image_doc(media_type: str | None = OCI_MANIFEST) -> dict[str, object]:
    doc: dict[str, object] = {"schemaVersion": 2, "config": descriptor(A), "layers": [descriptor(B), descriptor(C)]}
    if media_type:
        doc["mediaType"] = media_type
    return doc


def index_doc(media_type: str | None = OCI_INDEX) -> dict[str, object]:
    doc: dict[str, object] = {"schemaVersion": 2, "manifests": [descriptor(A, media_type=OCI_MANIFEST)]}
    if media_type:
        doc["mediaType"] = media_type
    return doc


@pytest.mark.parametrize("doc, content_type, kind", [
    (image_doc(), OCI_MANIFEST, IMAGE),
    (image_doc(DOCKER_MANIFEST), DOCKER_MANIFEST, IMAGE),
    (image_doc(None), None, IMAGE),  # OCI allows leaving mediaType out
    (image_doc(), "application/json", IMAGE),  # generic header: the body decides
    (index_doc(), OCI_INDEX, INDEX),
    (index_doc(DOCKER_LIST), DOCKER_LIST, INDEX),
    (index_doc(None), None, INDEX),
    ({"schemaVersion": 1, "fsLayers": [{"blobSum": A}]}, DOCKER_SCHEMA1_SIGNED, SCHEMA1),
    ({"schemaVersion": 1, "fsLayers": []}, None, SCHEMA1),
    ({"schemaVersion": 2, "mediaType": "application/vnd.example.thing+json"}, None, UNKNOWN),
    ({"schemaVersion": 2}, None, UNKNOWN),
])
def test_manifests_are_sorted_by_media_type(doc: dict[str, object], content_type: str | None,
                                             kind: str) -> None:
    assert parse_manifest(json.dumps(doc).encode(), content_type).kind == kind


def test_image_blobs_are_config_then_layers() -> None:
    manifest = parse_manifest(json.dumps(image_doc()).encode(), OCI_MANIFEST)
    assert [b.digest for b in manifest.blobs] == [A, B, C]
    assert [b.size for b in manifest.blobs] == [10, 10, 10]


def test_index_children_are_its_manifests() -> None:
    manifest = parse_manifest(json.dumps(index_doc()).encode(), OCI_INDEX)
    assert [c.digest for c in manifest.children] == [A]
    assert manifest.blobs == ()


def test_foreign_layers_are_set_aside_not_copied() -> None:
    doc = image_doc()
    foreign = descriptor(C, media_type="application/vnd.docker.image.rootfs.foreign.diff.tar.gzip")
    foreign["urls"] = ["https://example.invalid/layer"]
    doc["layers"] = [descriptor(B), foreign]
    manifest = parse_manifest(json.dumps(doc).encode(), OCI_MANIFEST)
    assert [b.digest for b in manifest.blobs] == [A, B]
    assert [b.digest for b in manifest.foreign] == [C]


@pytest.mark.parametrize("body", [
    b"not json",
    b"[1, 2]",
    json.dumps({"mediaType": OCI_MANIFEST, "layers": []}).encode(),  # no config
    json.dumps({**image_doc(), "layers": [descriptor("sha256:short")]}).encode(),
    json.dumps({**image_doc(), "layers": [descriptor("md5:" + "a" * 32)]}).encode(),
    json.dumps({**image_doc(), "layers": [descriptor("sha256:../../" + "a" * 58)]}).encode(),
    json.dumps({**image_doc(), "layers": [{"digest": A, "size": -1}]}).encode(),
    json.dumps({**image_doc(), "layers": [{"digest": A, "size": "10"}]}).encode(),
    json.dumps({"mediaType": OCI_INDEX, "manifests": "nope"}).encode(),
])
def test_malformed_manifests_are_errors_not_crashes(body: bytes) -> None:
    with pytest.raises(RegistryError):
        parse_manifest(body, None)


@pytest.mark.parametrize("text, ref", [
    ("team/app", ImageRef("team/app")),
    ("team/app:v1.2", ImageRef("team/app", tag="v1.2")),
    (f"team/app@{A}", ImageRef("team/app", digest=A)),
    ("a/b-c/d__e", ImageRef("a/b-c/d__e")),
])
def test_image_references(text: str, ref: ImageRef) -> None:
    assert parse_image_ref(text) == ref
    assert str(ref) == text


@pytest.mark.parametrize("text", ["Team/App", "team/app:", "team/app@sha256:xyz", "../etc", "a//b", ""])
def test_bad_image_references_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_image_ref(text)


# -- the client against a fake registry ------------------------------------------


@pytest.fixture
async def fake() -> AsyncIterator[FakeRegistry]:
    registry = FakeRegistry(page_size=3)
    server = TestServer(registry.app(), host="127.0.0.1")
    await server.start_server()
    registry.url = str(server.make_url("")).rstrip("/")
    yield registry
    await server.close()


def client(fake: FakeRegistry, attempts: int = 4) -> RegistryClient:
    return RegistryClient(fake.url, SourceLimits(rate=1000, concurrency=4),
                          Backoff(attempts=attempts, base=0.01, cap=0.05))


async def test_tags_follow_link_pagination(fake: FakeRegistry) -> None:
    for i in range(8):
        fake.add_image("team/app", f"v{i}", make_image(f"i{i}"))
    async with client(fake) as registry:
        tags = [entry.reference async for entry in registry.listing("team/app")]
    assert tags == [f"v{i}" for i in range(8)]
    assert fake.count("GET", "/tags/list") == 3  # pages of 3, 3 and 2


async def test_listing_without_a_map_leaves_tags_to_be_resolved(fake: FakeRegistry) -> None:
    fake.add_image("team/app", "v1", make_image("x"))
    async with client(fake) as registry:
        assert [e async for e in registry.listing("team/app")] == [Listed("v1")]


@pytest.mark.parametrize("placement", [WHOLE_MAP, PAGED_MAP])
async def test_listing_with_a_map_gives_tag_digests_then_untagged_manifests_once(
        fake: FakeRegistry, placement: str) -> None:
    fake.manifest_map = placement
    images = [make_image(f"i{i}") for i in range(4)]
    for i, image in enumerate(images):
        fake.add_image("team/app", f"v{i}", image)
    pinned = [make_image(f"pinned{i}") for i in range(2)]
    for image in pinned:
        fake.add_untagged("team/app", image.manifest, image.media_type, image.blobs)
    async with client(fake) as registry:
        entries = [e async for e in registry.listing("team/app")]
    assert fake.count("GET", "/tags/list") == 2  # pages of three
    tagged = [e for e in entries if not e.untagged]
    assert tagged == [Listed(f"v{i}", image.digest) for i, image in enumerate(images)]
    assert sorted(e.digest for e in entries if e.untagged) == sorted(i.digest for i in pinned)
    assert len(entries) == 6


async def test_listing_map_keys_that_are_not_digests_are_skipped(fake: FakeRegistry) -> None:
    fake.manifest_map, fake.map_extra = WHOLE_MAP, {"latest": {"tag": []}, "sha256:" + "0" * 63: {"tag": []}}
    fake.add_image("team/app", "v1", image := make_image("x"))
    async with client(fake) as registry:
        assert [e async for e in registry.listing("team/app")] == [Listed("v1", image.digest)]


async def test_pagination_link_to_another_host_is_refused(fake: FakeRegistry) -> None:
    fake.script["/v2/team/app/tags/list"] = [
        (200, {"Link": '<http://127.0.0.2:1/v2/team/app/tags/list?last=x>; rel="next"'}),
    ]
    async with client(fake) as registry:
        with pytest.raises(RegistryError, match="leaves the registry"):
            [entry async for entry in registry.listing("team/app")]


async def test_resolve_uses_head_and_fetches_no_manifest(fake: FakeRegistry) -> None:
    image = make_image("x")
    fake.add_image("team/app", "v1", image)
    async with client(fake) as registry:
        assert await registry.resolve("team/app", "v1") == image.digest
    assert fake.count("HEAD", "/manifests/") == 1
    assert fake.count("GET", "/manifests/") == 0


async def test_manifest_digest_is_verified(fake: FakeRegistry) -> None:
    image = make_image("x")
    fake.add_image("team/app", "v1", image)
    forged = image.manifest.replace(b'"schemaVersion": 2', b'"schemaVersion":  2')
    assert forged != image.manifest
    fake.manifests[image.digest] = (forged, image.media_type)
    async with client(fake) as registry:
        with pytest.raises(DigestMismatch):
            await registry.manifest("team/app", image.digest)


async def test_429_with_retry_after_is_retried(fake: FakeRegistry) -> None:
    image = make_image("x")
    fake.add_image("team/app", "v1", image)
    path = f"/v2/team/app/manifests/{image.digest}"
    fake.script[path] = [(429, {"Retry-After": "0"}), (503, {})]
    async with client(fake) as registry:
        body, _, digest = await registry.manifest("team/app", image.digest)
    assert (body, digest) == (image.manifest, image.digest)
    assert [r.status for r in fake.log if r.path == path] == [429, 503, 200]


async def test_retries_give_up_after_the_configured_attempts(fake: FakeRegistry) -> None:
    fake.add_image("team/app", "v1", make_image("x"))
    path = "/v2/team/app/manifests/v1"
    fake.script[path] = [(503, {})] * 10
    async with client(fake, attempts=3) as registry:
        with pytest.raises(RegistryError, match="503"):
            await registry.resolve("team/app", "v1")
    assert fake.count("HEAD", path) == 3


async def test_404_is_not_retried(fake: FakeRegistry) -> None:
    async with client(fake) as registry:
        with pytest.raises(NotFound):
            await registry.manifest("team/app", A)
    assert fake.count("GET", "/manifests/") == 1


async def test_anonymous_bearer_token_is_fetched_once_per_repository(fake: FakeRegistry) -> None:
    fake.require_token = True
    image = make_image("x")
    fake.add_image("team/app", "v1", image)
    async with client(fake) as registry:
        assert await registry.resolve("team/app", "v1") == image.digest
        await registry.manifest("team/app", image.digest)
        async with registry.blob("team/app", next(iter(image.blobs))) as resp:
            assert await resp.read() == next(iter(image.blobs.values()))
    assert fake.count("GET", "/token") == 1
    assert registry.requests == 5  # HEAD 401, token, HEAD, GET manifest, GET blob


async def test_registry_client_counts_every_request(fake: FakeRegistry) -> None:
    fake.add_image("team/app", "v1", make_image("x"))
    async with client(fake) as registry:
        [entry async for entry in registry.listing("team/app")]
        await registry.resolve("team/app", "v1")
    assert registry.requests == len(fake.log) == 2


def test_digest_helper_matches_registry_digests() -> None:
    assert digest_of(b"") == "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
