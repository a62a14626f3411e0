"""`archeio mirror` against real parts: the suite's docker-registry, moto's S3 server, skopeo.

The mirror runs as its own process (`python -m archeio mirror`), configured
as an operator would: a mirrors file, AWS credentials in the environment.
What it did is read back from the servers' own request logs and from the
buckets, never from the mirror's word:

- every blob of a set of images lands in two buckets, byte for byte, with
  its SHA-256 checksum, typed and anonymously readable;
- a second run uploads nothing (no PUT or POST reaches S3) and fetches no
  manifest or blob;
- a run killed with SIGKILL leaves only complete, correct blobs visible,
  and the next run finishes without uploading those again;
- a corrupt blob (from a fake registry) is refused and never visible;
- the request rate at the registry stays under the configured limit;
- and the proof it all serves its purpose: after mirroring, skopeo pulling
  through `archeio serve` as an AWS client of the bucket's region gets
  every blob from the bucket and none from the registry;
- untagged manifests (a tag moved on, an index pushed by digest only) are
  mirrored where the source lists them in Google's `manifest` map: a front
  of the registry (paging_registry.py) adds that map, read from the
  registry's own storage.

The images live in their own repositories (`mirror-test/...`) and buckets,
so the rest of the suite, which shares the registry and S3 server, is
unaffected.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from ..mirror_fakes import FakeRegistry, make_image, serve_in_thread
from . import images, services
from .clients import layout_blob, pulled_digest, skopeo_copy
from .images import Image, Layout, Platform
from .services import PagingRegistry, Registry, S3Server

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
PREFIX = "mirror-test"
REGION = "eu-west-3"
AWS_CLIENT = {"aws": "35.180.1.1"}  # AWS eu-west-3, only ever a header value
# Credentials for moto only; the mirror finds them through the standard AWS chain.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "integration", "AWS_SECRET_ACCESS_KEY": "integration",
    "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
}


@dataclass
class Pushed:
    """The images this module pushed, by repository (under PREFIX)."""

    one_v1: Image
    one_v2: Image
    multi: Image
    many: Image  # six 6 MiB layers: slow enough to interrupt, large enough for multipart
    tags: Image  # one image under many tags, for the rate test
    tag_count: int

    def blobs(self, *chosen: Image) -> dict[str, bytes]:
        return {b.digest: b.data for image in chosen for b in image.blobs}


def _tag_again(registry: Registry, repository: str, image: Image, tag: str) -> None:
    """Another tag for a pushed image: one manifest PUT, as `skopeo copy` would end with."""
    request = urllib.request.Request(
        f"{registry.url}/v2/{repository}/manifests/{tag}", data=image.manifest.data, method="PUT",
        headers={"Content-Type": image.manifest.media_type},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 201


@pytest.fixture(scope="module")
def pushed(workdir: Path, registry: Registry) -> Pushed:
    big_layers = [{"data.bin": hashlib.shake_256(f"many/{i}".encode()).digest(6 * MiB)} for i in range(6)]
    chosen = Pushed(
        one_v1=images.sample_image("mirror-one"),
        one_v2=images.sample_image("mirror-one-v2", layer_count=3),
        multi=images.multi_platform_image("mirror-multi", [Platform("linux", "amd64"), Platform("linux", "arm64")]),
        many=images.build_image("mirror-many", big_layers),
        tags=images.sample_image("mirror-tags", layer_count=1),
        tag_count=40,
    )
    layout = Layout(workdir / "mirror-layout")
    pushes = [("one_v1", "one", "v1"), ("one_v2", "one", "v2"), ("multi", "multi", "v1"),
              ("many", "many", "v1"), ("tags", "tags", "t0")]
    for ref, _, _ in pushes:
        layout.add(getattr(chosen, ref), ref)
    for ref, repository, tag in pushes:
        images.push(layout, ref, registry.host, f"{PREFIX}/{repository}", tag)
    for n in range(1, chosen.tag_count):
        _tag_again(registry, f"{PREFIX}/tags", chosen.tags, f"t{n}")
    return chosen


def new_buckets(s3: S3Server, count: int) -> list[str]:
    names = [f"mirror-{uuid.uuid4().hex[:16]}" for _ in range(count)]
    for name in names:
        s3.create_bucket(name)
    return names


def mirrors_file(workdir: Path, s3: S3Server, by_region: dict[str, str]) -> Path:
    path = workdir / f"mirrors-{uuid.uuid4().hex[:8]}.toml"
    return services.write_mirrors_file(path, {"AWS": {r: s3.bucket_url(b) for r, b in by_region.items()}})


def mirror_argv(source: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "archeio", "mirror", "--source", source, "--progress", "log", *args]


def mirror_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ARCHEIO_", "AWS_"))}
    return {**env, **AWS_ENV}


def run_mirror(source: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(mirror_argv(source, *args), env=mirror_env(), capture_output=True, text=True,
                          timeout=120, check=False)


def s3_writes(s3: S3Server, mark: int, buckets: list[str]) -> list[str]:
    """PUTs and POSTs (uploads, multipart steps, markers) to `buckets` after `mark`."""
    return [
        f"{r.method} {r.path}" for r in s3.log.since(mark)
        if r.method in ("PUT", "POST") and r.path.lstrip("/").split("/", 1)[0] in buckets
    ]


def stored_blobs(s3: S3Server, bucket: str) -> dict[str, bytes]:
    client = s3.client()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="containers/images/")
    keys = [item["Key"] for page in pages for item in page.get("Contents", ())]
    return {key.removeprefix("containers/images/"): client.get_object(Bucket=bucket, Key=key)["Body"].read()
            for key in keys}


def assert_blobs_in_bucket(s3: S3Server, bucket: str, blobs: dict[str, bytes]) -> None:
    client = s3.client()
    for digest, data in blobs.items():
        key = services.blob_key(digest)
        assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == data, key
        head = client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        assert head["ContentType"] == "application/octet-stream"
        # Small blobs go up in one PUT whose SHA-256 checksum is the digest itself.
        assert base64.b64decode(head["ChecksumSHA256"]).hex() == digest.removeprefix("sha256:")
        # What archeio serve does: an anonymous HEAD of <base URL>/containers/images/<digest>.
        assert services.http_status(f"{s3.bucket_url(bucket)}/{key}", method="HEAD") == 200


# -- copying, and copying again ------------------------------------------------------------


def test_mirror_copies_every_blob_into_both_buckets_and_a_rerun_uploads_nothing(
    workdir: Path, registry: Registry, s3: S3Server, pushed: Pushed,
) -> None:
    buckets = new_buckets(s3, 2)
    mirrors = mirrors_file(workdir, s3, {REGION: buckets[0], "ap-northeast-1": buckets[1]})
    repos = [f"{PREFIX}/one", f"{PREFIX}/multi"]
    done = run_mirror(registry.url, "--mirrors-file", str(mirrors), *repos)
    assert done.returncode == 0, done.stderr
    expected = pushed.blobs(pushed.one_v1, pushed.one_v2, pushed.multi)
    for bucket in buckets:
        assert_blobs_in_bucket(s3, bucket, expected)
        assert set(stored_blobs(s3, bucket)) == set(expected)
    assert f"copied {len(expected)} blobs" in done.stderr

    registry_mark, s3_mark = registry.log.mark(), s3.log.mark()
    again = run_mirror(registry.url, "--mirrors-file", str(mirrors), *repos)
    assert again.returncode == 0, again.stderr
    assert s3_writes(s3, s3_mark, buckets) == []
    fetched = [r for r in registry.log.since(registry_mark)
               if r.method == "GET" and ("/blobs/" in r.path or "/manifests/" in r.path)]
    assert fetched == []
    assert "3 already done" in again.stderr  # one:v1, one:v2, multi:v1


def test_blobs_already_present_are_not_uploaded_again(
    workdir: Path, registry: Registry, s3: S3Server, pushed: Pushed,
) -> None:
    [bucket] = new_buckets(s3, 1)
    present = pushed.one_v1.blobs[0]
    s3.put_public(bucket, services.blob_key(present.digest), present.data)
    s3_mark = s3.log.mark()
    done = run_mirror(registry.url, "--to", s3.bucket_url(bucket), f"{PREFIX}/one:v1")
    assert done.returncode == 0, done.stderr
    writes = s3_writes(s3, s3_mark, [bucket])
    assert not any(present.digest in w for w in writes)
    assert len([w for w in writes if "/containers/images/" in w]) == len(pushed.one_v1.blobs) - 1


# -- interrupted and resumed -----------------------------------------------------------------


def _finished_blob_writes(s3: S3Server, mark: int, buckets: list[str]) -> list[str]:
    """Keys whose upload completed: a plain PUT, or the POST completing a multipart upload."""
    finished = []
    for r in s3.log.since(mark):
        bucket, _, key = r.path.lstrip("/").partition("/")
        if bucket not in buckets or not key.startswith("containers/images/") or r.status != 200:
            continue
        if (r.method == "PUT" and not r.query) or (r.method == "POST" and "uploadId=" in r.query):
            finished.append(f"{bucket}/{key}")
    return finished


def test_a_killed_run_leaves_only_whole_blobs_and_the_next_run_finishes_without_reuploading(
    workdir: Path, registry: Registry, s3: S3Server, pushed: Pushed,
) -> None:
    buckets = new_buckets(s3, 2)
    args = ["--to", s3.bucket_url(buckets[0]), "--to", s3.bucket_url(buckets[1]),
            "--rate", "4", "--concurrency", "1", "--part-size", "5", f"{PREFIX}/many:v1"]
    log_path = workdir / f"mirror-killed-{uuid.uuid4().hex[:8]}.log"
    mark = s3.log.mark()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(mirror_argv(registry.url, *args), env=mirror_env(), stdout=log, stderr=log,
                                   start_new_session=True)
        try:
            services.wait_until(lambda: _finished_blob_writes(s3, mark, buckets), what="a first finished blob",
                                timeout=60, alive=lambda: None)
            assert process.poll() is None, "the run finished before it could be interrupted"
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
    assert process.returncode == -signal.SIGKILL
    expected = pushed.blobs(pushed.many)
    before = {}
    for bucket in buckets:
        visible = stored_blobs(s3, bucket)
        # Whatever is visible is whole: its bytes hash to its name.
        for digest, data in visible.items():
            assert digest == "sha256:" + hashlib.sha256(data).hexdigest()
        before[bucket] = set(visible)
        # A multipart upload the kill cut short stays invisible.
        pending = s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        assert not {u["Key"].removeprefix("containers/images/") for u in pending} & set(visible)
    assert before[buckets[0]] and before[buckets[0]] != set(expected), "the kill should land mid-run"

    resume_mark = s3.log.mark()
    resumed = run_mirror(registry.url, *args[:4], f"{PREFIX}/many:v1")
    assert resumed.returncode == 0, resumed.stderr
    for bucket in buckets:
        assert stored_blobs(s3, bucket) == expected
        rewritten = [w for w in s3_writes(s3, resume_mark, [bucket])
                     if any(digest in w for digest in before[bucket])]
        assert rewritten == [], f"blobs finished before the kill were uploaded again: {rewritten}"


# -- a corrupt source ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [20_000, 7 * MiB], ids=["one-put", "multipart"])
def test_a_corrupt_blob_from_the_registry_never_becomes_visible(
    s3: S3Server, size: int,
) -> None:
    [bucket] = new_buckets(s3, 1)
    image = make_image(f"corrupt-{size}", (size,))
    layer = next(d for d, data in image.blobs.items() if len(data) == size)
    fake = FakeRegistry()
    fake.add_image("team/app", "v1", image)
    fake.corrupt[layer] = image.blobs[layer][:-1] + bytes([image.blobs[layer][-1] ^ 1])
    mark = s3.log.mark()
    with serve_in_thread(fake):
        done = run_mirror(fake.url, "--to", s3.bucket_url(bucket), "--part-size", "5", "team/app")
    assert done.returncode == 1
    assert f"FAILED {layer}: bytes hash to sha256:" in done.stderr
    assert set(stored_blobs(s3, bucket)) == set(image.blobs) - {layer}  # the config blob is fine
    assert services.http_status(f"{s3.bucket_url(bucket)}/{services.blob_key(layer)}", method="HEAD") == 404
    assert s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    if size > 5 * MiB:  # the upload was begun, then aborted
        aborted = [r for r in s3.log.since(mark) if r.method == "DELETE" and layer in r.path]
        assert len(aborted) == 1


# -- politeness ------------------------------------------------------------------------------------

_LOG_TIME = "%d/%b/%Y:%H:%M:%S %z"


def _requests_per_second(registry: Registry, mark: int) -> Counter[str]:
    """Registry requests after `mark`, counted per second of the registry's own log clock."""
    lines = registry.log.path.read_text(errors="replace").splitlines()
    stamps: Counter[str] = Counter()
    requests = 0
    for line in lines:
        if '" ' not in line or "[" not in line:
            continue
        requests += 1
        if requests <= mark:
            continue
        stamp = line.split("[", 1)[1].split("]", 1)[0]
        datetime.strptime(stamp, _LOG_TIME)  # a clear error if the log format changes
        stamps[stamp] += 1
    return stamps


def test_request_rate_at_the_registry_stays_under_the_limit(
    registry: Registry, s3: S3Server, pushed: Pushed,
) -> None:
    rate, burst = 10, 1
    # An image under 40 tags: one HEAD per tag, so the run is ~45 requests.
    [bucket] = new_buckets(s3, 1)
    mark = registry.log.mark()
    done = run_mirror(registry.url, "--to", s3.bucket_url(bucket), "--rate", str(rate), f"{PREFIX}/tags")
    assert done.returncode == 0, done.stderr
    per_second = _requests_per_second(registry, mark)
    assert sum(per_second.values()) >= pushed.tag_count
    # The limiter allows rate * 1 s + burst in any second; half as much again
    # is slack for requests the log stamps a little late.
    limit = rate * 1.5 + burst
    assert max(per_second.values()) <= limit, per_second

    # The same walk without the limit packs a second beyond it: the check above can fail.
    mark = registry.log.mark()
    unlimited = run_mirror(registry.url, "--to", s3.bucket_url(bucket), "--rate", "10000",
                           "--dry-run", f"{PREFIX}/tags")
    assert unlimited.returncode == 0, unlimited.stderr
    assert max(_requests_per_second(registry, mark).values()) > limit


# -- the point of it all: pulls come from the bucket -------------------------------------------------


def test_after_mirroring_an_aws_client_pulls_every_blob_from_its_regions_bucket(
    workdir: Path, registry: Registry, s3: S3Server, pushed: Pushed, tmp_path: Path,
) -> None:
    [bucket, default_bucket] = new_buckets(s3, 2)
    mirrors = mirrors_file(workdir, s3, {REGION: bucket})
    done = run_mirror(registry.url, "--mirrors-file", str(mirrors), f"{PREFIX}/one:v1", f"{PREFIX}/multi:v1")
    assert done.returncode == 0, done.stderr
    settings = {
        "UPSTREAM_REGISTRY_ENDPOINT": registry.url,
        "UPSTREAM_REGISTRY_PATH": PREFIX,
        "DEFAULT_AWS_BASE_URL": s3.bucket_url(default_bucket),  # never the real CDN
        "ARCHEIO_MIRRORS_FILE": str(mirrors),
    }
    with (
        services.archeio_server(workdir, settings, name="archeio-mirror") as archeio,
        services.nginx_proxy(workdir, archeio.url, AWS_CLIENT, name="nginx-mirror") as proxy,
    ):
        for image, reference, extra in ((pushed.one_v1, "one:v1", ()), (pushed.multi, "multi:v1", ("--all",))):
            registry_mark, s3_mark = registry.log.mark(), s3.log.mark()
            layout = skopeo_copy(proxy, "aws", reference, tmp_path / reference.replace(":", "-"), *extra)
            assert pulled_digest(layout) == image.digest
            for blob in image.blobs:
                assert layout_blob(layout, blob.digest) == blob.data
                from_registry = [r for r in registry.log.since(registry_mark)
                                 if r.method == "GET" and r.path.endswith(f"/blobs/{blob.digest}")]
                from_bucket = [r for r in s3.log.since(s3_mark)
                               if r.method == "GET" and r.path == f"/{bucket}/{services.blob_key(blob.digest)}"]
                assert from_registry == [], f"{blob.digest} came from the registry"
                assert len(from_bucket) >= 1, f"{blob.digest} did not come from {bucket}"


def test_done_markers_record_each_image_with_its_blobs(
    registry: Registry, s3: S3Server, pushed: Pushed,
) -> None:
    [bucket] = new_buckets(s3, 1)
    done = run_mirror(registry.url, "--to", s3.bucket_url(bucket), f"{PREFIX}/multi:v1")
    assert done.returncode == 0, done.stderr
    key = f"archeio-mirror/done/{PREFIX}/multi@{pushed.multi.digest}"
    record = json.loads(s3.client().get_object(Bucket=bucket, Key=key)["Body"].read())
    assert record["blobs"] == sorted(b.digest for b in pushed.multi.blobs)
    assert record["manifests"] == 3  # the index and its two platforms


# -- every manifest, tagged or not: Google's manifest map ---------------------------------------------


@dataclass
class Untagged:
    """A repository holding manifests no tag points at."""

    repository: str
    moved: Image  # was `v1`, until the tag moved on to `current`
    current: Image  # `v1` now
    pinned: Image  # a two-platform index pushed by digest only: it and its children have no tag

    def untagged_blobs(self) -> dict[str, bytes]:
        return {b.digest: b.data for image in (self.moved, self.pinned) for b in image.blobs}


@pytest.fixture(scope="module")
def untagged(workdir: Path, registry: Registry) -> Untagged:
    chosen = Untagged(
        repository=f"{PREFIX}/untagged",
        moved=images.sample_image("mirror-moved"),
        current=images.sample_image("mirror-current"),
        pinned=images.multi_platform_image("mirror-pinned", [Platform("linux", "amd64"), Platform("linux", "arm64")]),
    )
    layout = Layout(workdir / "untagged-layout")
    layout.add(chosen.moved, "moved")
    layout.add(chosen.current, "current")
    images.push(layout, "moved", registry.host, chosen.repository, "v1")
    images.push(layout, "current", registry.host, chosen.repository, "v1")  # `moved` keeps only its digest
    for child in chosen.pinned.children:
        images.push_over_http(registry.url, chosen.repository, child.digest, child)
    images.push_over_http(registry.url, chosen.repository, chosen.pinned.digest, chosen.pinned)
    return chosen


@pytest.fixture(scope="module")
def mapped_source(workdir: Path, registry: Registry, untagged: Untagged) -> Iterator[PagingRegistry]:
    """The registry behind a front whose tag lists carry the manifest map."""
    with services.paging_registry(workdir, registry, "paging-manifest-map", manifest_map=True) as front:
        yield front


def mirror_into_a_new_bucket(s3: S3Server, source: str, repository: str) -> tuple[str, str]:
    """(the bucket, the run's log) of a successful run copying `repository` from `source`."""
    [bucket] = new_buckets(s3, 1)
    done = run_mirror(source, "--to", s3.bucket_url(bucket), repository)
    assert done.returncode == 0, done.stderr
    return bucket, done.stderr


def test_untagged_manifests_in_the_sources_map_are_mirrored(
    mapped_source: PagingRegistry, s3: S3Server, untagged: Untagged,
) -> None:
    mark = mapped_source.log.mark()
    bucket, log = mirror_into_a_new_bucket(s3, mapped_source.url, untagged.repository)
    expected = {**untagged.untagged_blobs(), **{b.digest: b.data for b in untagged.current.blobs}}
    assert stored_blobs(s3, bucket) == expected
    # The moved image, the pinned index and its two children.
    assert f"{untagged.repository}: 4 untagged manifests listed by the registry, mirrored too" in log
    # The map named v1's digest: no HEAD was needed to resolve it.
    assert not [r for r in mapped_source.log.since(mark) if r.method == "HEAD"]


def test_without_the_map_only_the_tagged_manifest_is_mirrored(
    registry: Registry, s3: S3Server, untagged: Untagged,
) -> None:
    bucket, _ = mirror_into_a_new_bucket(s3, registry.url, untagged.repository)
    assert stored_blobs(s3, bucket) == {b.digest: b.data for b in untagged.current.blobs}


def test_a_rerun_through_the_map_fetches_no_manifest_and_uploads_nothing(
    mapped_source: PagingRegistry, s3: S3Server, untagged: Untagged,
) -> None:
    bucket, _ = mirror_into_a_new_bucket(s3, mapped_source.url, untagged.repository)
    source_mark, s3_mark = mapped_source.log.mark(), s3.log.mark()
    again = run_mirror(mapped_source.url, "--to", s3.bucket_url(bucket), untagged.repository)
    assert again.returncode == 0, again.stderr
    assert s3_writes(s3, s3_mark, [bucket]) == []
    assert [r.path for r in mapped_source.log.since(source_mark)] == [f"/v2/{untagged.repository}/tags/list"]
    assert "5 already done" in again.stderr  # v1, the moved image, the index and its two children
