"""containerd, the client Kubernetes nodes use, pulls through archeio with a hosts.toml mirror.

The daemon runs privately (its own root, state and socket in the session's
temporary directory, no runtime or CRI plugins: pulling and unpacking need
neither). Its hosts.toml maps a registry name to one nginx listener, the
way a node is pointed at a mirror; `server` is the same loopback address,
so a failing mirror can never send containerd anywhere else.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from . import services
from .clients import assert_served_from_right_place
from .places import Places
from .services import Archeio, Containerd, Proxy
from .topology import Catalog

pytestmark = pytest.mark.integration

REGISTRY_NAME = "registry.archeio.test"


@pytest.fixture(scope="module")
def containerd(workdir: Path, archeio: Archeio) -> Iterator[Containerd]:
    """A fresh daemon (empty content store) for each archeio, so each engine's pull is a real one."""
    try:
        services.require_tools("containerd", "ctr")
    except services.MissingTool as exc:
        pytest.fail(str(exc), pytrace=False)
    with services.containerd_daemon(workdir, name=f"containerd-{archeio.url.rsplit(':', 1)[1]}") as daemon:
        yield daemon


def hosts_dir(workdir: Path, mirror_url: str) -> Path:
    """A containerd hosts directory sending REGISTRY_NAME's pulls to `mirror_url`."""
    directory = workdir / "containerd-hosts"
    (directory / REGISTRY_NAME).mkdir(parents=True, exist_ok=True)
    (directory / REGISTRY_NAME / "hosts.toml").write_text(
        f'server = "{mirror_url}"\n\n'
        f'[host."{mirror_url}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
    )
    return directory


def test_containerd_pulls_and_unpacks_its_platform_from_the_regional_bucket(
    containerd: Containerd, proxy: Proxy, catalog: Catalog, places: Places, workdir: Path,
) -> None:
    image = catalog.multi
    amd64 = next(c for c in image.children if c.platform and c.platform.architecture == "amd64")
    arm64 = next(c for c in image.children if c is not amd64)
    hosts = hosts_dir(workdir, proxy.urls["aws_region_one"])
    reference = f"{REGISTRY_NAME}/{image.name}:v1"
    mark = places.mark()
    pulled = containerd.ctr(
        "images", "pull", "--hosts-dir", str(hosts), "--snapshotter", "native",
        "--platform", "linux/amd64", reference, timeout=120,
    )
    assert pulled.returncode == 0, pulled.stderr
    listed = containerd.ctr("images", "ls")
    assert listed.returncode == 0, listed.stderr
    [row] = [line.split() for line in listed.stdout.splitlines() if line.startswith(reference)]
    assert image.digest in row
    # The unpacked snapshot exists: the image is usable, not only downloaded.
    checked = containerd.ctr("images", "check", f"name=={reference}")
    assert "complete" in checked.stdout, checked.stdout + checked.stderr
    assert_served_from_right_place(places, mark, catalog, "aws_region_one", amd64.blobs)
    for blob in arm64.blobs:
        assert not places.blob_gets_since(mark, blob.digest), f"arm64 blob {blob.digest} was fetched"
