"""Fixtures of the container tests: podman, the stand-in base image, the archeio image.

Once per session: check that podman can run (failing with the missing step,
never skipping), build the stand-in for the Dockerfile's base image
(standin.py), then build deploy/Dockerfile as a user would, with three
additions that change nothing in the Dockerfile:

- the host's CA bundle, and a pip.conf naming it, are mounted into every
  build step: outbound TLS here goes through an intercepting proxy whose CA
  a fresh container does not know;
- the `ranges` stage fetches the AWS and Google Cloud feeds from a loopback
  HTTP server serving the small files of tests/data/ranges (its build
  arguments are meant for an internal copy), and the build uses the host's
  network to reach it; Azure's file is the embedded data's, as in every
  build;
- `--format docker`, without which podman drops the HEALTHCHECK.

Everything lives in a podman storage of this session (podman.py), removed
when the session ends: every run starts cold, as CI does. To keep it
between runs while working on these tests, name a directory in
ARCHEIO_TEST_PODMAN_HOME (delete it to start cold again).
"""

from __future__ import annotations

import functools
import os
import shutil
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ..conftest import RANGES_FIXTURES
from ..integration.services import MissingTool
from . import standin
from .podman import Podman, PodmanHome, PodmanUnusable

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "Dockerfile"
IMAGE = "localhost/archeio:container-tests"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


@pytest.fixture(scope="session")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    kept = os.environ.get("ARCHEIO_TEST_PODMAN_HOME")
    root = Path(kept) if kept else tmp_path_factory.mktemp("podman")
    root.mkdir(parents=True, exist_ok=True)
    home = PodmanHome(root)
    home.write_config()
    running = Podman(home)
    try:
        running.preflight()
    except (PodmanUnusable, MissingTool) as exc:
        pytest.fail(str(exc), pytrace=False)
    yield running
    if not kept:
        running.remove_everything()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def range_feeds() -> Iterator[str]:
    """Base URL of a loopback HTTP server serving tests/data/ranges."""

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(RANGES_FIXTURES)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def dockerfile_base_image() -> str:
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("ARG PYTHON_IMAGE="):
            return line.partition("=")[2].strip()
    raise AssertionError("deploy/Dockerfile has no ARG PYTHON_IMAGE=<default>")


@pytest.fixture(scope="session")
def base_image(podman: Podman, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The stand-in, under the exact name the Dockerfile's FROM lines use."""
    assert dockerfile_base_image() == standin.NAME, "the stand-in imitates another base image than the Dockerfile's"
    if podman("image", "exists", standin.NAME, check=False).returncode != 0:
        standin.build(podman, tmp_path_factory.mktemp("standin"))
    return standin.NAME


@pytest.fixture(scope="session")
def image(podman: Podman, base_image: str, range_feeds: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """deploy/Dockerfile, built by podman from the repository as the docs say."""
    mounts: list[str] = []
    if HOST_CA_BUNDLE.is_file():
        pip_conf = tmp_path_factory.mktemp("build") / "pip.conf"
        pip_conf.write_text(f"[global]\ncert = {HOST_CA_BUNDLE}\n")
        mounts = ["--volume", f"{HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro", "--volume", f"{pip_conf}:/etc/pip.conf:ro"]
    podman(
        "build", "--format", "docker", "--pull=never", "--network", "host", *mounts,
        "--build-arg", f"AWS_RANGES_URL={range_feeds}/aws-ip-ranges.json",
        "--build-arg", f"GCP_RANGES_URL={range_feeds}/gcp-cloud.json",
        "--ignorefile", str(DOCKERFILE.parent / "Dockerfile.dockerignore"),
        "--file", str(DOCKERFILE), "--tag", IMAGE, str(REPO),
        timeout=1200,
    )
    return IMAGE
