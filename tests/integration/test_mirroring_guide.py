"""docs/mirroring.md, run: its marked commands copy images through archeio into a second registry.

The guide's blocks marked `<!-- mirroring-test -->` are taken from the
document itself and run in order (shell blocks with bash, the Python block
with this interpreter, which has the oras SDK), so the guide and the test
cannot drift apart. The only changes made to them: `registry.k8s.io`
becomes the paged archeio (its upstream pages tag lists, as real
registries do) and `mirror.example.internal:5000` a second real
docker-registry; both speak plain HTTP, which skopeo is told through a
registries.conf marking them insecure (the guide's `skopeo` is a shim that
adds `--registries-conf`: skopeo 1.9 ignores CONTAINERS_REGISTRIES_CONF,
and the system's file is not ours to change) and oras through the guide's
own `HTTPS` switch.

Blocks labelled `file NAME` (a list of images) are written to NAME in
the commands' directory when reached, as a user would save them.

Afterwards every image in the mirror is compared with what was built and
pushed (manifests byte for byte, every child of the index, every blob, the
signature, every image kubeadm would pull from the mirror), and the
runtime configurations of the guide are used for real: skopeo with the
guide's registries.conf (what CRI-O and podman read) and containerd with
its hosts.toml must pull from the mirror, not from archeio, and containerd
1.6 must load the guide's config.toml with every key and value it sets.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ..guides import MIRRORING, Block, blocks
from . import guide_runner, images, services
from .images import Image, Layout, Platform
from .services import Registry, S3Server
from .topology import BUCKET_DEFAULT, UPSTREAM_PATH, PagedWorld

pytestmark = pytest.mark.integration

SOURCE_NAME = "registry.k8s.io"
MIRROR_NAME = "mirror.example.internal:5000"


def guide_blocks() -> list[Block]:
    return blocks(MIRRORING, "mirroring-test")


@dataclass
class Pushed:
    """The images the guide copies, as built and pushed to the source registry."""

    by_reference: dict[str, Image]  # "pause:3.10" -> image
    signature: Image  # cosign's signature of kube-proxy:v1.31.0
    signature_tag: str


@pytest.fixture(scope="module")
def pushed(workdir: Path, paged: PagedWorld, registry: Registry, signature_registry: Registry,
           s3: S3Server) -> Pushed:
    kube_proxy = images.multi_platform_image(
        "kube-proxy", [Platform("linux", "amd64"), Platform("linux", "arm64")])
    by_reference = {
        "pause:3.9": images.sample_image("pause-3.9"),
        "pause:3.10": images.sample_image("pause-3.10"),
        "kube-proxy:v1.31.0": kube_proxy,
        "coredns/coredns:v1.11.1": images.sample_image("coredns-1"),
        "coredns/coredns:v1.11.3": images.sample_image("coredns-3"),
        "coredns/coredns:v1.12.0": images.sample_image("coredns-12"),
        # The rest of what kubeadm v1.31.0 lists.
        "kube-apiserver:v1.31.0": images.sample_image("kube-apiserver", layer_count=1),
        "kube-controller-manager:v1.31.0": images.sample_image("kube-controller-manager", layer_count=1),
        "kube-scheduler:v1.31.0": images.sample_image("kube-scheduler", layer_count=1),
        "etcd:3.5.15-0": images.sample_image("etcd", layer_count=1),
    }
    layout = Layout(workdir / "guide-layout")
    for reference, image in by_reference.items():
        layout.add(image, reference)
        name, tag = reference.rsplit(":", 1)
        images.push(layout, reference, registry.host, f"{UPSTREAM_PATH}/{name}", tag)
    signature = images.cosign_signature("kube-proxy", f"{SOURCE_NAME}/kube-proxy", kube_proxy)
    tag = images.signature_tag(kube_proxy.digest)
    layout.add(signature, "kube-proxy-signature")
    images.push(layout, "kube-proxy-signature", signature_registry.host, f"{UPSTREAM_PATH}/kube-proxy", tag)
    # Only a signature's manifest is sent to the signature registry; its blobs
    # are requested as blobs, which go to the mirrors (then the source
    # registry). As in production, the mirror holds them.
    for blob in signature.blobs:
        s3.put_public(BUCKET_DEFAULT, services.blob_key(blob.digest), blob.data)
    return Pushed(by_reference, signature, tag)


@pytest.fixture(scope="module")
def mirror(workdir: Path) -> Iterator[Registry]:
    with services.docker_registry(workdir, "mirror-registry") as running:
        yield running


def localize(text: str, source: str, mirror: str) -> str:
    return guide_runner.localize(text, {SOURCE_NAME: source, MIRROR_NAME: mirror})


@pytest.fixture(scope="module")
def guide_run(pushed: Pushed, paged: PagedWorld, mirror: Registry,
              tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Run every marked command block of the guide, in order; their outputs by block number."""
    workdir = tmp_path_factory.mktemp("guide")
    env = guide_runner.shell_env(workdir, paged.archeio.host, mirror.host)
    outputs = {}
    for number, block in enumerate(guide_blocks()):
        if block.label is not None:
            if block.label.startswith("file "):
                (workdir / block.label.removeprefix("file ")).write_text(
                    localize(block.body, paged.archeio.host, mirror.host))
            continue
        body = localize(block.body, paged.archeio.host, mirror.host)
        if block.lang == "sh":
            done = guide_runner.run_shell(body, workdir, env)
        elif block.lang == "python":
            switch = "HTTPS = True"
            assert switch in body, "the guide's oras block lost its HTTPS switch"
            done = subprocess.run([sys.executable, "-c", body.replace(switch, "HTTPS = False")], cwd=workdir,
                                  env=env, capture_output=True, text=True, timeout=300, check=False)
        else:
            raise AssertionError(f"block {number}: no way to run {block.lang!r}")
        assert done.returncode == 0, f"guide block {number} failed:\n{block.body}\n{done.stdout}\n{done.stderr}"
        outputs[str(number)] = done.stdout
    return outputs


def mirrored_manifest(mirror: Registry, name: str, reference: str) -> bytes:
    request = urllib.request.Request(
        f"{mirror.url}/v2/{name}/manifests/{reference}",
        headers={"Accept": ", ".join([images.OCI_MANIFEST, images.OCI_INDEX])},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return bytes(response.read())


def mirror_holds_blob(mirror: Registry, name: str, digest: str) -> bool:
    request = urllib.request.Request(f"{mirror.url}/v2/{name}/blobs/{digest}", method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status) == 200
    except urllib.error.HTTPError:
        return False


def test_the_guide_has_command_blocks_and_both_runtime_configurations() -> None:
    labels = {block.label for block in guide_blocks()}
    assert {None, "containerd hosts.toml", "containerd 1.x config.toml", "registries.conf", "file images.txt",
            "kubeadm images"} <= labels
    assert sum(1 for block in guide_blocks() if block.label is None) >= 5


def test_every_image_of_the_guide_is_in_the_mirror_with_its_digest(
    guide_run: dict[str, str], pushed: Pushed, mirror: Registry,
) -> None:
    for reference, image in pushed.by_reference.items():
        name, tag = reference.rsplit(":", 1)
        assert mirrored_manifest(mirror, name, tag) == image.manifest.data, reference
        # An index is kept whole: every platform's manifest and every blob.
        for child in image.children:
            assert mirrored_manifest(mirror, name, child.digest) == child.manifest.data, (reference, child.platform)
        for blob in image.blobs:
            assert mirror_holds_blob(mirror, name, blob.digest), (reference, blob.digest)


def test_the_signature_is_copied_along(guide_run: dict[str, str], pushed: Pushed, mirror: Registry) -> None:
    assert mirrored_manifest(mirror, "kube-proxy", pushed.signature_tag) == pushed.signature.manifest.data
    for blob in pushed.signature.blobs:
        assert mirror_holds_blob(mirror, "kube-proxy", blob.digest)


def test_the_guides_own_checks_report_the_source_digests(guide_run: dict[str, str], pushed: Pushed) -> None:
    printed = "".join(guide_run.values())
    assert f"pause:3.10 {pushed.by_reference['pause:3.10'].digest}" in printed
    for reference in ("pause:3.9", "pause:3.10", "kube-proxy:v1.31.0", "coredns/coredns:v1.11.1"):
        assert re.search(rf"^{re.escape(reference)}: [1-9]\d* blobs present$", printed, re.M), printed


def pull_pause(workdir: Path, name: str, host: str, hosts_toml: str) -> str:
    """`<host>/pause:3.10` pulled by a containerd of its own with `hosts_toml` for `host`; its image list."""
    hosts = workdir / f"{name}-hosts"
    (hosts / host).mkdir(parents=True, exist_ok=True)
    (hosts / host / "hosts.toml").write_text(hosts_toml)
    # A daemon per archeio: an empty content store, so the pull is a real one.
    with services.containerd_daemon(workdir, f"{name}-{host.rsplit(':', 1)[1]}") as containerd:
        pulled = containerd.ctr("images", "pull", "--hosts-dir", str(hosts), "--snapshotter", "native",
                                f"{host}/pause:3.10", timeout=120)
        assert pulled.returncode == 0, pulled.stderr
        return containerd.ctr("images", "ls").stdout


def _config_block(label: str, source: str, mirror: str) -> str:
    [block] = [b for b in guide_blocks() if b.label == label]
    return localize(block.body, source, mirror)


def test_registries_conf_of_the_guide_pulls_from_the_mirror(
    guide_run: dict[str, str], pushed: Pushed, paged: PagedWorld, mirror: Registry, tmp_path: Path,
) -> None:
    """What CRI-O and podman read, used through skopeo (the same containers/image library)."""
    conf = _config_block("registries.conf", paged.archeio.host, mirror.host)
    # Plain HTTP on both sides in the test; the guide's hosts speak HTTPS.
    conf = re.sub(r'^(location = ".*")$', r"\1\ninsecure = true", conf, flags=re.M)
    (tmp_path / "registries.conf").write_text(conf)
    mirror_mark, upstream_mark = mirror.log.mark(), paged.upstream.log.mark()
    done = subprocess.run(
        [images.require_tools("skopeo")["skopeo"], "--registries-conf", str(tmp_path / "registries.conf"),
         "inspect", "--raw", f"docker://{paged.archeio.host}/pause:3.10"],
        capture_output=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == pushed.by_reference["pause:3.10"].manifest.data
    assert any(r.path == "/v2/pause/manifests/3.10" for r in mirror.log.since(mirror_mark))
    assert not any("/pause/" in r.path for r in paged.upstream.log.since(upstream_mark))


def test_containerd_hosts_toml_of_the_guide_pulls_from_the_mirror(
    guide_run: dict[str, str], pushed: Pushed, paged: PagedWorld, mirror: Registry, workdir: Path,
) -> None:
    image = pushed.by_reference["pause:3.10"]
    mirror_mark, upstream_mark = mirror.log.mark(), paged.upstream.log.mark()
    listed = pull_pause(workdir, "containerd-guide", paged.archeio.host,
                        _config_block("containerd hosts.toml", paged.archeio.host, mirror.host))
    assert image.digest in listed
    fetched = {r.path for r in mirror.log.since(mirror_mark) if r.method == "GET"}
    assert {f"/v2/pause/blobs/{blob.digest}" for blob in image.blobs} <= fetched
    assert not any("/pause/" in r.path for r in paged.upstream.log.since(upstream_mark))


def test_every_image_kubeadm_pulls_from_the_mirror_is_there_with_the_sources_digest(
    guide_run: dict[str, str], pushed: Pushed, paged: PagedWorld, mirror: Registry,
) -> None:
    listed = _config_block("kubeadm images", paged.archeio.host, mirror.host).split()
    assert len(listed) == 7
    for reference in listed:
        host, _, name_tag = reference.partition("/")
        assert host == mirror.host, reference
        name, tag = name_tag.rsplit(":", 1)
        # kubeadm names CoreDNS <repository>/coredns: the guide's copy renames it.
        source = "coredns/coredns" if name == "coredns" else name
        image = pushed.by_reference[f"{source}:{tag}"]
        assert mirrored_manifest(mirror, name, tag) == image.manifest.data, reference
        for blob in image.blobs:
            assert mirror_holds_blob(mirror, name, blob.digest), (reference, blob.digest)


def _leaves(table: dict[str, Any], path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    for key, value in table.items():
        if isinstance(value, dict):
            yield from _leaves(value, (*path, key))
        else:
            yield (*path, key), value


def test_containerd_loads_the_guides_config_toml_with_every_value_it_sets(tmp_path: Path) -> None:
    [text] = [b.body for b in guide_blocks() if b.label == "containerd 1.x config.toml"]
    (tmp_path / "config.toml").write_text(text)
    containerd = services.require_tools("containerd")["containerd"]
    dumped = subprocess.run([containerd, "--config", str(tmp_path / "config.toml"), "config", "dump"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert dumped.returncode == 0, dumped.stderr
    loaded = tomllib.loads(dumped.stdout)
    # A misspelt key is dropped silently, leaving containerd's default: each value must be there.
    for path, value in _leaves(tomllib.loads(text)):
        found: Any = loaded
        for key in path:
            found = found[key]
        assert found == value, path


def test_containerd_sends_pulls_to_a_harbor_projects_path(
    pushed: Pushed, paged: PagedWorld, mirror: Registry, workdir: Path,
) -> None:
    """The Harbor hosts.toml: `registry.k8s.io/pause` is pulled from `<host>/v2/k8s/pause` (a registry stands in)."""
    image = pushed.by_reference["pause:3.10"]
    layout = Layout(workdir / "guide-harbor-layout")
    layout.add(image, "pause")
    images.push(layout, "pause", mirror.host, "k8s/pause", "3.10")
    [block] = [b for b in guide_blocks() if b.label == "containerd hosts.toml for Harbor"]
    mirror_mark, upstream_mark = mirror.log.mark(), paged.upstream.log.mark()
    pull_pause(workdir, "containerd-harbor", paged.archeio.host, guide_runner.localize(
        block.body, {SOURCE_NAME: paged.archeio.host, "harbor.example.internal": mirror.host}))
    asked = mirror.log.since(mirror_mark)
    assert any(r.path == "/v2/k8s/pause/manifests/3.10" for r in asked)  # the tag, resolved at the project's path
    fetched = {r.path for r in asked if r.method == "GET"}
    assert {f"/v2/k8s/pause/blobs/{blob.digest}" for blob in image.blobs} <= fetched
    assert not any("/pause/" in r.path for r in paged.upstream.log.since(upstream_mark))
