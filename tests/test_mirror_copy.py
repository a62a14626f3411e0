"""`archeio mirror` end to end against fakes: an in-memory registry and moto's S3 server.

The mirror runs through its command line (`archeio.cli.main`), as a user
runs it; the registry fake counts what it was asked for and misbehaves on
demand (corrupt bytes, 5xx, schema 1), the bucket side is moto's real S3
HTTP server.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from archeio.cli import main

from .mirror_fakes import (
    OCI_INDEX,
    PAGED_MAP,
    WHOLE_MAP,
    FakeImage,
    FakeRegistry,
    MotoS3,
    digest_of,
    make_image,
    make_index,
    moto_s3,
    serve_in_thread,
)

MiB = 1024 * 1024
BLOBS = "containers/images/"
DONE = "archeio-mirror/done/"


@pytest.fixture(scope="module")
def s3() -> Iterator[MotoS3]:
    with moto_s3() as running:
        yield running


@pytest.fixture
def registry() -> Iterator[FakeRegistry]:
    with serve_in_thread(FakeRegistry(page_size=2)) as running:
        yield running


@pytest.fixture
def buckets(s3: MotoS3) -> list[str]:
    """Two fresh buckets (moto's state lives as long as the module)."""
    return [f"mirror-{uuid.uuid4().hex[:12]}" for _ in range(2)]


def mirror(registry: FakeRegistry, s3: MotoS3, buckets: list[str], *args: str) -> int:
    destinations = []
    for name in buckets:
        if name not in {b["Name"] for b in s3.client.list_buckets()["Buckets"]}:
            s3.bucket(name)
        destinations += ["--to", f"{s3.url}/{name}"]
    return main(["mirror", "--source", registry.url, *destinations, "--progress", "log",
                 "--part-size", "5", "--rate", "1000", *args])


def assert_blob_stored(s3: MotoS3, bucket: str, digest: str, data: bytes) -> None:
    key = BLOBS + digest
    assert s3.read(bucket, key) == data
    head = s3.client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    assert head["ContentType"] == "application/octet-stream"
    if len(data) <= 5 * MiB:
        # One PUT: S3's SHA-256 checksum is the OCI digest itself.
        assert base64.b64decode(head["ChecksumSHA256"]).hex() == digest.split(":")[1]
    else:
        # Multipart: the checksum of the parts' checksums (5 MiB parts).
        parts = [hashlib.sha256(data[i:i + 5 * MiB]).digest() for i in range(0, len(data), 5 * MiB)]
        composite = base64.b64encode(hashlib.sha256(b"".join(parts)).digest()).decode()
        assert head["ChecksumSHA256"].split("-")[0] == composite
    grants = s3.client.get_object_acl(Bucket=bucket, Key=key)["Grants"]
    assert any(g["Grantee"].get("URI", "").endswith("/AllUsers") and g["Permission"] == "READ" for g in grants)


def test_every_blob_lands_in_every_bucket_with_its_checksum(
        registry: FakeRegistry, s3: MotoS3, buckets: list[str]) -> None:
    small = make_image("small", (3000, 70_000))
    large = make_image("large", (11 * MiB + 7,))  # three parts of 5 MiB
    registry.add_image("team/app", "v1", small)
    registry.add_image("team/app", "v2", large)
    registry.add_image("team/app", "latest", large)  # same image under another tag
    assert mirror(registry, s3, buckets, "team/app") == 0
    for bucket in buckets:
        for image in (small, large):
            for digest, data in image.blobs.items():
                assert_blob_stored(s3, bucket, digest, data)
        assert s3.keys(bucket, DONE) == {f"{DONE}team/app@{small.digest}", f"{DONE}team/app@{large.digest}"}
    # Each blob was read from the registry once, for both buckets.
    for image in (small, large):
        for digest in image.blobs:
            assert registry.count("GET", f"/blobs/{digest}") == 1


def test_rerun_skips_finished_images_without_fetching_manifests(
        registry: FakeRegistry, s3: MotoS3, buckets: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    registry.add_image("team/app", "v1", make_image("one"))
    registry.add_image("team/app", "v2", make_image("two"))
    assert mirror(registry, s3, buckets, "team/app") == 0
    registry.log.clear()
    capsys.readouterr()
    assert mirror(registry, s3, buckets, "team/app") == 0
    assert registry.count("GET", "/manifests/") == 0
    assert registry.count("GET", "/blobs/") == 0
    assert registry.count("HEAD", "/manifests/") == 2  # one tag -> digest each
    assert "2 already done" in capsys.readouterr().err


def test_blobs_already_in_a_bucket_are_not_fetched_again(
        registry: FakeRegistry, s3: MotoS3, buckets: list[str]) -> None:
    image = make_image("present")
    registry.add_image("team/app", "v1", image)
    assert mirror(registry, s3, buckets, "team/app") == 0
    for bucket in buckets:  # forget the images, keep the blobs
        for key in s3.keys(bucket, DONE):
            s3.client.delete_object(Bucket=bucket, Key=key)
    registry.log.clear()
    assert mirror(registry, s3, buckets, "team/app") == 0
    assert registry.count("GET", "/manifests/") == 1
    assert registry.count("GET", "/blobs/") == 0
    assert all(s3.keys(bucket, DONE) for bucket in buckets)


def test_a_blob_missing_from_one_bucket_is_copied_to_that_one(
        registry: FakeRegistry, s3: MotoS3, buckets: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    image = make_image("half", (4000,))
    registry.add_image("team/app", "v1", image)
    layer = next(d for d, data in image.blobs.items() if len(data) == 4000)
    s3.bucket(buckets[0])
    s3.client.put_object(Bucket=buckets[0], Key=BLOBS + layer, Body=image.blobs[layer])
    assert mirror(registry, s3, buckets, "team/app") == 0
    assert f"copied {layer} (4.0 kB) to 1 bucket\n" in capsys.readouterr().err
    assert_blob_stored(s3, buckets[1], layer, image.blobs[layer])


@pytest.mark.parametrize("size", [4000, 6 * MiB], ids=["one-put", "multipart"])
def test_a_corrupt_blob_is_rejected_and_never_visible(
        registry: FakeRegistry, s3: MotoS3, buckets: list[str], size: int,
        capsys: pytest.CaptureFixture[str]) -> None:
    bad = make_image("bad", (size,))
    good = make_image("good")
    registry.add_image("team/bad", "v1", bad)
    registry.add_image("team/good", "v1", good)
    layer = next(d for d, data in bad.blobs.items() if len(data) == size)
    data = bytearray(bad.blobs[layer])
    data[size // 2] ^= 0xFF  # same size, different bytes
    registry.corrupt[layer] = bytes(data)
    assert mirror(registry, s3, buckets, "team/bad", "team/good") == 1
    err = capsys.readouterr().err
    assert f"FAILED {layer}: bytes hash to" in err
    assert "failed 1;" in err
    for bucket in buckets:
        assert BLOBS + layer not in s3.keys(bucket, BLOBS)
        assert s3.client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
        assert s3.keys(bucket, DONE) == {f"{DONE}team/good@{good.digest}"}  # the good image is done
        for digest, blob in good.blobs.items():
            assert s3.read(bucket, BLOBS + digest) == blob


@pytest.mark.parametrize("extra", [b"x", b"x" * (6 * MiB)], ids=["one-byte", "many"])
def test_a_registry_sending_more_than_the_size_is_rejected(
        registry: FakeRegistry, s3: MotoS3, buckets: list[str], extra: bytes) -> None:
    image = make_image("long", (4000,))
    registry.add_image("team/app", "v1", image)
    layer = next(d for d, data in image.blobs.items() if len(data) == 4000)
    registry.corrupt[layer] = image.blobs[layer] + extra
    assert mirror(registry, s3, buckets, "team/app") == 1
    assert all(BLOBS + layer not in s3.keys(b, BLOBS) for b in buckets)


def test_transient_registry_errors_are_retried(
        registry: FakeRegistry, s3: MotoS3, buckets: list[str]) -> None:
    image = make_image("flaky")
    registry.add_image("team/app", "v1", image)
    layer = next(iter(image.blobs))
    registry.script[f"/v2/team/app/blobs/{layer}"] = [(503, {}), (429, {"Retry-After": "0"})]
    assert mirror(registry, s3, buckets, "team/app") == 0
    assert registry.count("GET", f"/blobs/{layer}") == 3
    assert s3.read(buckets[0], BLOBS + layer) == image.blobs[layer]


def test_indexes_lead_to_every_platforms_blobs(
        registry: FakeRegistry, s3: MotoS3, buckets: list[str]) -> None:
    children = [make_image("amd64"), make_image("arm64")]
    index = make_index(children)
    for child in children:
        registry.manifests[child.digest] = (child.manifest, child.media_type)
        registry.blobs.update(child.blobs)
    index_digest = registry.add_manifest("team/multi", "v1", index, OCI_INDEX)
    assert mirror(registry, s3, buckets, "team/multi:v1") == 0
    for child in children:
        for digest, data in child.blobs.items():
            assert s3.read(buckets[1], BLOBS + digest) == data
    # The index is done, and so is each child, which a registry's map lists as a manifest of its own.
    assert s3.keys(buckets[0], DONE) == {f"{DONE}team/multi@{d}" for d in (index_digest, *(c.digest for c in children))}
    child_record = json.loads(s3.read(buckets[0], f"{DONE}team/multi@{children[0].digest}"))
    assert child_record["index"] == index_digest
    assert child_record["blobs"] == sorted(children[0].blobs)


# -- every manifest, tagged or not: the `manifest` map of Google's registries ------------------


def stored(s3: MotoS3, bucket: str) -> set[str]:
    return {k.removeprefix(BLOBS) for k in s3.keys(bucket, BLOBS)}


def moved_tag_and_pinned_index(registry: FakeRegistry) -> tuple[FakeImage, FakeImage, list[FakeImage], str]:
    """team/app: v1 moved from `old` to `new`, and an index pushed by digest only (its children untagged too)."""
    old, new = make_image("old"), make_image("new")
    registry.add_untagged("team/app", old.manifest, old.media_type, old.blobs)  # v1 pointed here once
    registry.add_image("team/app", "v1", new)
    children = [make_image("pinned-amd64"), make_image("pinned-arm64")]
    for child in children:
        registry.add_untagged("team/app", child.manifest, child.media_type, child.blobs)
    index = registry.add_untagged("team/app", make_index(children), OCI_INDEX, {})
    return old, new, children, index


@pytest.mark.parametrize("placement", [WHOLE_MAP, PAGED_MAP])
def test_untagged_manifests_of_the_map_are_mirrored(
        registry: FakeRegistry, s3: MotoS3, buckets: list[str], placement: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    registry.manifest_map = placement
    old, new, children, _ = moved_tag_and_pinned_index(registry)
    for tag in ("v2", "v3"):  # pages of two tags: the map's parts are spread over two pages
        registry.add_image("team/app", tag, new)
    assert mirror(registry, s3, buckets, "team/app") == 0
    expected = set(old.blobs) | set(new.blobs) | {d for c in children for d in c.blobs}
    for bucket in buckets:
        assert stored(s3, bucket) == expected
    assert "team/app: 4 untagged manifests listed by the registry, mirrored too" in capsys.readouterr().err


def test_without_a_map_only_tagged_manifests_are_mirrored(
        registry: FakeRegistry, s3: MotoS3, buckets: list[str]) -> None:
    old, new, children, _ = moved_tag_and_pinned_index(registry)
    assert registry.manifest_map == ""
    assert mirror(registry, s3, buckets, "team/app") == 0
    assert stored(s3, buckets[0]) == set(new.blobs)


def test_tags_the_map_names_are_not_resolved_with_a_head(
        registry: FakeRegistry, s3: MotoS3, buckets: list[str]) -> None:
    registry.manifest_map = WHOLE_MAP
    for i in range(5):
        registry.add_image("team/app", f"v{i}", make_image(f"head-{i}"))
    assert mirror(registry, s3, buckets, "team/app") == 0
    assert registry.count("HEAD", "/manifests/") == 0
    assert registry.count("GET", "/manifests/") == 5


def test_an_untagged_index_and_its_children_are_done_and_a_rerun_fetches_no_manifest(
        registry: FakeRegistry, s3: MotoS3, buckets: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    registry.manifest_map = WHOLE_MAP
    old, new, children, index = moved_tag_and_pinned_index(registry)
    assert mirror(registry, s3, buckets, "team/app") == 0
    marked = {old.digest, new.digest, index, *(c.digest for c in children)}
    assert s3.keys(buckets[1], DONE) == {f"{DONE}team/app@{d}" for d in marked}
    registry.log.clear()
    capsys.readouterr()
    assert mirror(registry, s3, buckets, "team/app") == 0
    assert registry.count("GET", "/manifests/") == 0
    assert registry.count("HEAD", "/manifests/") == 0
    assert "5 already done" in capsys.readouterr().err  # v1, old, the index, its two children


@pytest.mark.parametrize("extra", [
    {"sha256:short": {"tag": []}},
    {"md5:" + "a" * 32: {"tag": []}},
    {"sha256:" + "a" * 64: "not an entry"},
], ids=["short-digest", "other-algorithm", "entry-not-an-object"])
def test_malformed_map_entries_are_skipped_and_the_others_mirrored(
        registry: FakeRegistry, s3: MotoS3, buckets: list[str], extra: dict[str, object]) -> None:
    registry.manifest_map, registry.map_extra = WHOLE_MAP, extra
    pinned = make_image("pinned")
    registry.add_untagged("team/app", pinned.manifest, pinned.media_type, pinned.blobs)
    registry.add_image("team/app", "v1", image := make_image("plain"))
    assert mirror(registry, s3, buckets, "team/app") == 0
    assert stored(s3, buckets[0]) == set(image.blobs) | set(pinned.blobs)


def test_a_map_entry_whose_tags_are_not_a_list_is_mirrored_by_digest(
        registry: FakeRegistry, s3: MotoS3, buckets: list[str]) -> None:
    pinned = make_image("pinned")
    registry.manifests[pinned.digest] = (pinned.manifest, pinned.media_type)
    registry.blobs.update(pinned.blobs)
    registry.manifest_map, registry.map_extra = WHOLE_MAP, {pinned.digest: {"tag": "v9"}}
    registry.add_image("team/app", "v1", image := make_image("plain"))
    assert mirror(registry, s3, buckets, "team/app") == 0
    assert stored(s3, buckets[0]) == set(image.blobs) | set(pinned.blobs)


def test_a_map_that_is_not_an_object_is_ignored(registry: FakeRegistry, s3: MotoS3, buckets: list[str]) -> None:
    registry.manifest_map, registry.raw_map = WHOLE_MAP, ["not", "a", "map"]
    registry.add_image("team/app", "v1", image := make_image("plain"))
    assert mirror(registry, s3, buckets, "team/app") == 0
    assert stored(s3, buckets[0]) == set(image.blobs)
    assert registry.count("HEAD", "/manifests/v1") == 1


def test_docker_v2_images_are_mirrored(registry: FakeRegistry, s3: MotoS3, buckets: list[str]) -> None:
    image = make_image("docker", media_type="application/vnd.docker.distribution.manifest.v2+json")
    registry.add_image("team/app", "v1", image)
    assert mirror(registry, s3, buckets, f"team/app@{image.digest}") == 0
    assert {k.removeprefix(BLOBS) for k in s3.keys(buckets[0], BLOBS)} == set(image.blobs)


def test_schema1_and_unknown_manifests_are_reported_not_fatal(
        registry: FakeRegistry, s3: MotoS3, buckets: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    schema1 = json.dumps({"schemaVersion": 1, "name": "team/old", "fsLayers": []}).encode()
    registry.add_manifest("team/old", "v1", schema1, "application/vnd.docker.distribution.manifest.v1+prettyjws")
    registry.add_manifest("team/odd", "v1", b'{"schemaVersion": 2}', "application/vnd.example+json")
    good = make_image("fine")
    registry.add_image("team/fine", "v1", good)
    assert mirror(registry, s3, buckets, "team/old", "team/odd", "team/fine") == 0
    err = capsys.readouterr().err
    assert "unsupported manifest type application/vnd.docker.distribution.manifest.v1+prettyjws" in err
    assert "unsupported manifest type application/vnd.example+json" in err
    assert "2 unsupported" in err
    assert s3.keys(buckets[0], DONE) == {f"{DONE}team/fine@{good.digest}"}


def test_dry_run_writes_nothing_and_says_what_it_would_copy(
        registry: FakeRegistry, s3: MotoS3, buckets: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    image = make_image("dry")
    registry.add_image("team/app", "v1", image)
    assert mirror(registry, s3, buckets, "team/app", "--dry-run") == 0
    assert all(s3.keys(bucket) == set() for bucket in buckets)
    assert registry.count("GET", "/blobs/") == 0
    err = capsys.readouterr().err
    assert err.count("would copy sha256:") == len(image.blobs)
    assert f"summary: would copy {len(image.blobs)} blobs" in err


def test_missing_repository_fails_the_run(
        registry: FakeRegistry, s3: MotoS3, buckets: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert mirror(registry, s3, buckets, "team/nothing") == 1
    assert "FAILED team/nothing (listing tags)" in capsys.readouterr().err


def test_repositories_file_entries_are_mirrored(
        registry: FakeRegistry, s3: MotoS3, buckets: list[str], tmp_path: Path) -> None:
    image = make_image("listed")
    registry.add_image("team/listed", "v1", image)
    registry.add_image("team/listed", "v2", make_image("not-listed"))
    listing = tmp_path / "repos.txt"
    listing.write_text("# the images we serve\nteam/listed:v1  # pinned\n\n")
    assert mirror(registry, s3, buckets, "--repositories-file", str(listing)) == 0
    assert {k.removeprefix(BLOBS) for k in s3.keys(buckets[0], BLOBS)} == set(image.blobs)


def test_a_bad_repositories_file_entry_is_a_usage_error_naming_its_line(
        registry: FakeRegistry, s3: MotoS3, buckets: list[str], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    listing = tmp_path / "repos.txt"
    listing.write_text("# every image we serve\nteam/app\n\nteam/App:v1\n")
    assert mirror(registry, s3, buckets, "--repositories-file", str(listing)) == 2
    err = capsys.readouterr().err
    assert f"{listing}:4: 'team/App:v1': not a repository name" in err
    assert registry.log == []


def test_a_repository_named_twice_is_listed_once(
        registry: FakeRegistry, s3: MotoS3, buckets: list[str], tmp_path: Path) -> None:
    registry.add_image("team/app", "v1", make_image("twice"))
    listing = tmp_path / "repos.txt"
    listing.write_text("team/app\n  team/app   # again\n")
    assert mirror(registry, s3, buckets, "team/app", "--repositories-file", str(listing)) == 0
    assert registry.count("GET", "/tags/list") == 1


def test_a_refused_catalog_says_to_list_the_repositories(
        registry: FakeRegistry, s3: MotoS3, buckets: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    registry.script["/v2/_catalog"] = [(404, {})]  # as registry.k8s.io answers
    assert mirror(registry, s3, buckets, "--all-repositories") == 1
    err = capsys.readouterr().err
    assert "FAILED the catalog: /v2/_catalog: not found (404); a registry that does not list its " \
        "repositories needs them named, one a line, in --repositories-file" in err


def test_all_repositories_walks_the_paginated_catalog(
        registry: FakeRegistry, s3: MotoS3, buckets: list[str]) -> None:
    expected: set[str] = set()
    for name in ("a/one", "b/two", "c/three"):  # pages of two repositories
        image = make_image(name)
        registry.add_image(name, "v1", image)
        expected |= set(image.blobs)
    assert mirror(registry, s3, buckets, "--all-repositories") == 0
    assert registry.count("GET", "/v2/_catalog") == 2
    assert {k.removeprefix(BLOBS) for k in s3.keys(buckets[1], BLOBS)} == expected


def test_progress_bar_on_request(
        registry: FakeRegistry, s3: MotoS3, buckets: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    registry.add_image("team/app", "v1", make_image("bar"))
    assert mirror(registry, s3, buckets, "team/app", "--progress", "bar") == 0
    err = capsys.readouterr().err
    assert "\r\x1b[K[" in err and " blobs " in err and "ETA" in err
    # The bar is cleared and the summary takes its line.
    assert err.rsplit("\r\x1b[K", 1)[1].startswith("summary: copied 3 blobs")


@pytest.mark.parametrize("argv, message", [
    (["--source", "http://127.0.0.1:1", "--to", "http://127.0.0.1:1/b-1"], "nothing to mirror"),
    (["--source", "http://127.0.0.1:1", "team/app"], "no destination"),
    (["--source", "http://127.0.0.1:1", "--to", "https://cdn.example.net", "team/app"], "cannot tell the bucket"),
    (["--source", "http://127.0.0.1:1", "--to", "http://127.0.0.1:1/b-1", "Team/App"], "not a repository name"),
])
def test_usage_errors_exit_2_with_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ARCHEIO_MIRRORS_FILE", raising=False)
    assert main(["mirror", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_fake_image_digests_are_real(registry: FakeRegistry) -> None:
    image: FakeImage = make_image("check")
    assert image.digest == digest_of(image.manifest)
    assert all(d == digest_of(b) for d, b in image.blobs.items())
