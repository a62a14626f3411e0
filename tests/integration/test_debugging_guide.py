"""docs/debugging.md, run: the checks it gives users, and the runtime errors it quotes.

The guide's blocks marked `<!-- debugging-test -->` are taken from the
document and run in order against archeio in front of a real registry
(the paged one of the suite), with only `registry.k8s.io` replaced: by
archeio's host:port, or by `localhost` in the DNS block (a name is what it
resolves). Each block's output must show what the guide says it shows.

The table of containerd's errors is checked row by row: each failure not
marked "not reproduced here" is caused for real and pulled with containerd
1.6's `ctr`, and every fragment the row quotes must appear in its error. A
missing tag, a name that does not resolve and a closed port need no help;
the refusals come from nginx (a real HTTP server) standing where Google's
front end or a bucket would, behind an archeio of their own: 403 for a
manifest or a blob, 429 for a manifest.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ..engines import ENGINES
from ..guides import DEBUGGING, blocks
from . import guide_runner, images, services
from .images import Image, Layout
from .services import Archeio, Containerd, Registry, S3Server
from .topology import UPSTREAM_PATH, PagedWorld, archeio_settings

pytestmark = pytest.mark.integration

NAME = "registry.k8s.io"
NOT_REPRODUCED = "(not reproduced here)"


@pytest.fixture(scope="module")
def pause(workdir: Path, registry: Registry) -> Image:
    """pause:3.10 in the source registry (the same bytes as the mirroring guide's test pushes)."""
    image = images.sample_image("pause-3.10")
    layout = Layout(workdir / "debugging-guide-layout")
    layout.add(image, "pause")
    images.push(layout, "pause", registry.host, f"{UPSTREAM_PATH}/pause", "3.10")
    return image


@pytest.fixture(scope="module")
def guide_run(pause: Image, paged: PagedWorld,
              tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess[str]]:
    """Every marked block of the guide, run in order; the runs by the block's first line."""
    workdir = tmp_path_factory.mktemp("debugging-guide")
    env = guide_runner.shell_env(workdir, paged.archeio.host)
    runs = {}
    for block in blocks(DEBUGGING, "debugging-test"):
        assert block.lang == "sh", block.body
        host = "localhost" if block.label == "dns" else paged.archeio.host
        done = guide_runner.run_shell(guide_runner.localize(block.body, {NAME: host}), workdir, env)
        assert done.returncode == 0, f"guide block failed:\n{block.body}\n{done.stdout}\n{done.stderr}"
        runs[block.body.splitlines()[0]] = done
    return runs


def test_the_guide_has_its_checks() -> None:
    first_lines = [b.body.splitlines()[0] for b in blocks(DEBUGGING, "debugging-test")]
    assert first_lines[:3] == ["getent ahosts registry.k8s.io", "curl -v https://registry.k8s.io/v2/",
                               "skopeo list-tags docker://registry.k8s.io/pause"]
    assert first_lines[3].startswith("digest=$(skopeo inspect")


def test_the_dns_check_prints_the_addresses_of_the_name(
        guide_run: dict[str, subprocess.CompletedProcess[str]]) -> None:
    printed = guide_run["getent ahosts registry.k8s.io"].stdout
    assert re.search(r"^(127\.0\.0\.1|::1)\s", printed, re.M), printed


def test_curl_shows_the_registry_apis_answer(guide_run: dict[str, subprocess.CompletedProcess[str]]) -> None:
    trace = guide_run["curl -v https://registry.k8s.io/v2/"].stderr
    assert "< HTTP/1.1 200" in trace
    assert "< docker-distribution-api-version: registry/2.0" in trace.lower()


def test_skopeo_lists_the_tags(guide_run: dict[str, subprocess.CompletedProcess[str]]) -> None:
    listed = json.loads(guide_run["skopeo list-tags docker://registry.k8s.io/pause"].stdout)
    assert "3.10" in listed["Tags"]


def test_one_blobs_hops_are_a_redirect_then_the_blob(
        guide_run: dict[str, subprocess.CompletedProcess[str]], pause: Image) -> None:
    [run] = [r for first, r in guide_run.items() if first.startswith("digest=$(skopeo inspect")]
    first, *hops = run.stdout.splitlines()
    assert re.fullmatch(rf"307 http://\S+/{re.escape(pause.layers[0].digest)}", first), first
    statuses = [line.split()[1] for line in hops if line.startswith("HTTP/")]
    locations = [line for line in hops if line.lower().startswith("location:")]
    assert statuses == ["307", "200"], run.stdout
    assert locations[0].split(" ", 1)[1].strip() == first.split(" ", 1)[1]


# -- the runtime's errors ------------------------------------------------------------------------


def error_rows() -> dict[str, list[str]]:
    """The table's rows: failure -> the fragments of containerd's error it quotes."""
    rows = {}
    for line in DEBUGGING.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[1].startswith("`"):
            rows[cells[0]] = re.findall(r"`([^`]+)`", cells[1])
    return rows


@pytest.fixture(scope="module", params=ENGINES)
def refusing_archeio(request: pytest.FixtureRequest, workdir: Path, registry: Registry,
                     signature_registry: Registry, s3: S3Server, pause: Image) -> Iterator[Archeio]:
    """archeio whose source answers through nginx: 403 for /forbidden/ and every blob, 429 for /limited/.

    The signature upstream is the same front: with one of its own, the signature fallback would send
    what the front refuses there instead, and the refusal would never reach the client."""
    with services.refusing_front(workdir, registry, f"nginx-refusing-{request.param}") as front:
        settings = archeio_settings(workdir, registry, signature_registry, s3, UPSTREAM_REGISTRY_ENDPOINT=front.url,
                                    SIGNATURE_UPSTREAM_ENDPOINT=front.url, ARCHEIO_HTTP=request.param)
        with services.archeio_server(workdir, settings, name=f"archeio-refusing-{request.param}") as running:
            yield running


@pytest.fixture(scope="module")
def containerd(workdir: Path) -> Iterator[Containerd]:
    with services.containerd_daemon(workdir, "containerd-debugging-guide") as daemon:
        yield daemon


def pull(containerd: Containerd, reference: str) -> str:
    """ctr's error pulling `reference` over plain HTTP; the pull must fail."""
    done = containerd.ctr("images", "pull", "--plain-http", "--snapshotter", "native", reference, timeout=120)
    assert done.returncode != 0, f"{reference} was pulled"
    return done.stderr


# failure -> (the host that stands for registry.k8s.io, the repository pulled as pause:3.10 or :3.99).
CAUSES: dict[str, Callable[[Archeio], tuple[str, str]]] = {
    "the tag or digest does not exist": lambda archeio: (archeio.host, "pause:3.99"),
    "the name does not resolve": lambda archeio: (f"{NAME}.invalid", "pause:3.10"),
    "nothing listens, or a firewall rejects": lambda archeio: (f"127.0.0.1:{services.free_port()}", "pause:3.10"),
    # nginx behind archeio answers 403 for paths with /forbidden/ and every blob, 429 for /limited/.
    "a host refuses a manifest": lambda archeio: (archeio.host, "forbidden/pause:3.10"),
    "a host refuses a blob": lambda archeio: (archeio.host, "pause:3.10"),
    "too many requests from the address": lambda archeio: (archeio.host, "limited/pause:3.10"),
}


def test_every_row_is_reproduced_or_says_it_is_not() -> None:
    rows = error_rows()
    assert len(rows) >= 8
    assert {failure for failure in rows if NOT_REPRODUCED not in failure} == set(CAUSES)


@pytest.mark.parametrize("failure", sorted(CAUSES))
def test_containerds_error_has_the_words_the_guide_quotes(
        failure: str, refusing_archeio: Archeio, containerd: Containerd) -> None:
    host, reference = CAUSES[failure](refusing_archeio)
    error = pull(containerd, f"{host}/{reference}")
    for fragment in error_rows()[failure]:
        local = guide_runner.localize(fragment, {NAME: host})
        assert local in error, f"{failure}: {local!r} not in {error!r}"
