"""The image of deploy/Dockerfile, built and run as an operator would run it.

Every container here runs hardened as the docs advise: read-only root with
nothing writable at all (`--read-only-tmpfs=false`: no tmpfs on /tmp, as
`docker run --read-only` gives), every capability dropped, as the image's
own user (no --user), on the host's network with free loopback ports. The
blob mirrors are a loopback bucket (the DEFAULT_AWS_BASE_URL of an unknown
client, and Azure canadacentral's mirror in a mounted mirrors file), so
every Location below is exact. The image's range data is its own, baked in
at build time: AWS and Google Cloud from the build's feeds (here the small
files of tests/data/ranges), Azure from the embedded data.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator

import pytest

from ..conftest import AZURE_CANADACENTRAL, GOOGLE_CLOUD, NOBODY, free_port
from ..deploy_support import REPO
from ..ops_support import BLOB, MISSING_BLOB, REGISTRY_PATH, ThreadedBucket, http_get, xff
from .podman import Container, Podman, podman_messages, running_container

pytestmark = [pytest.mark.container, pytest.mark.timeout(1800)]

HARDENED = ("--read-only", "--read-only-tmpfs=false", "--cap-drop", "all")
UPSTREAM = "https://us-central1-docker.pkg.dev"
# `podman stop`'s wait before SIGKILL: Docker's default, and Cloud Run's.
STOP_TIMEOUT = 10
# ARCHEIO_GRACE_PERIOD's default; the server must be done well before STOP_TIMEOUT.
GRACE_PERIOD = 5


def unique(name: str) -> str:
    return f"archeio-test-{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def bucket() -> Iterator[ThreadedBucket]:
    with ThreadedBucket() as running:
        yield running


MIRRORS_IN_CONTAINER = "/etc/archeio/mirrors.toml"


@pytest.fixture(scope="module")
def server(podman: Podman, image: str, bucket: ThreadedBucket,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    mirrors = tmp_path_factory.mktemp("mirrors") / "mirrors.toml"
    mirrors.write_text(f'[mirrors.Azure]\n"canadacentral" = "{bucket.base("azure-canadacentral")}"\n')
    mirrors.chmod(0o644)  # read by the image's own user
    with running_container(
        podman, image, unique("server"), port=free_port(), admin_port=free_port(),
        flags=(*HARDENED, "--volume", f"{mirrors}:{MIRRORS_IN_CONTAINER}:ro"),
        env={"DEFAULT_AWS_BASE_URL": bucket.base("cdn"), "UPSTREAM_REGISTRY_ENDPOINT": UPSTREAM,
             "ARCHEIO_MIRRORS_FILE": MIRRORS_IN_CONTAINER},
    ) as container:
        container.wait_ready()
        yield container


def run_to_completion(podman: Podman, image: str, *args: str, env: dict[str, str] | None = None,
                      flags: tuple[str, ...] = ()) -> tuple[int, str]:
    """(exit status, output) of a one-off hardened container."""
    with running_container(podman, image, unique("once"), port=free_port(), admin_port=free_port(),
                           flags=(*HARDENED, *flags), env=env, args=args) as container:
        status = int(podman("wait", container.name, timeout=120).stdout.strip())
        return status, podman.logs(container.name)


def in_image(server: Container, script: str) -> str:
    """Run a Python script inside the running container (as its user); its stdout."""
    result = server.exec("python", "-c", script)
    assert result.returncode == 0, podman_messages(result.stderr)
    return result.stdout


# -- serving -------------------------------------------------------------------------


def test_v2_answers_200(server: Container) -> None:
    status, headers, _ = http_get(server.url + "/v2/")
    assert status == 200 and headers["Docker-Distribution-Api-Version"] == "registry/2.0"


def test_manifest_redirects_upstream(server: Container) -> None:
    status, headers, _ = http_get(server.url + "/v2/pause/manifests/3.10")
    assert status == 307
    assert headers["Location"] == f"{UPSTREAM}/v2/{REGISTRY_PATH}/pause/manifests/3.10"


def test_blob_in_the_mirror_redirects_to_the_mirror(server: Container, bucket: ThreadedBucket) -> None:
    status, headers, _ = http_get(f"{server.url}/v2/pause/blobs/{BLOB}", headers=xff(NOBODY))
    assert status == 307
    assert headers["Location"] == f"{bucket.base('cdn')}/containers/images/{BLOB}"


def test_blob_missing_from_the_mirror_redirects_upstream(server: Container) -> None:
    status, headers, _ = http_get(f"{server.url}/v2/pause/blobs/{MISSING_BLOB}", headers=xff(NOBODY))
    assert status == 307
    assert headers["Location"] == f"{UPSTREAM}/v2/{REGISTRY_PATH}/pause/blobs/{MISSING_BLOB}"


def test_blob_for_a_google_cloud_client_redirects_upstream_by_the_baked_in_ranges(server: Container) -> None:
    status, headers, _ = http_get(f"{server.url}/v2/pause/blobs/{BLOB}", headers=xff(GOOGLE_CLOUD))
    assert status == 307
    assert headers["Location"] == f"{UPSTREAM}/v2/{REGISTRY_PATH}/pause/blobs/{BLOB}"


def test_blob_for_an_azure_client_goes_to_its_regions_mirror_by_the_baked_in_ranges(
    server: Container, bucket: ThreadedBucket,
) -> None:
    status, headers, _ = http_get(f"{server.url}/v2/pause/blobs/{BLOB}", headers=xff(AZURE_CANADACENTRAL))
    assert status == 307
    assert headers["Location"] == f"{bucket.base('azure-canadacentral')}/containers/images/{BLOB}"


def test_image_carries_the_ranges_of_all_three_providers(server: Container) -> None:
    script = "import os; print(' '.join(sorted(os.listdir(os.environ['ARCHEIO_RANGES_DIR']))))"
    assert in_image(server, script).split() == ["aws-ip-ranges.json", "azure-service-tags.json", "gcp-cloud.json"]


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_admin_probe_answers_200(server: Container, path: str) -> None:
    assert http_get(server.admin_url + path)[0] == 200


def test_admin_metrics_are_served(server: Container) -> None:
    status, _, body = http_get(server.admin_url + "/metrics")
    assert status == 200 and re.search(rb"^archeio_\w+", body, re.M), body[:500]


def test_healthcheck_of_the_image_passes(podman: Podman, server: Container) -> None:
    # Fails with "has no defined healthcheck" when the image lost it (OCI format).
    result = podman("healthcheck", "run", server.name, check=False)
    assert result.returncode == 0, result.stdout + podman_messages(result.stderr)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_image_with_an_empty_ranges_directory_exits_2_naming_it(
    podman: Podman, image: str, workers: str, tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # Every client would be "unknown" (Google Cloud's blobs to the CDN):
    # the server refuses to start rather than serve so, one worker or two.
    empty = tmp_path_factory.mktemp("empty-ranges")
    empty.chmod(0o755)  # read by the image's own user
    status, output = run_to_completion(
        podman, image, "serve", "--workers", workers, env={"ARCHEIO_RANGES_DIR": "/srv/ranges"},
        flags=("--volume", f"{empty}:/srv/ranges:ro"),
    )
    assert status == 2
    assert output.strip().splitlines() == [
        "archeio: configuration error: ARCHEIO_RANGES_DIR: /srv/ranges: no provider's ranges "
        "(none of aws-ip-ranges.json, gcp-cloud.json, azure-service-tags.json)"
    ], output


# -- how it runs ---------------------------------------------------------------------


def test_server_runs_as_the_images_non_root_user_without_capabilities(server: Container) -> None:
    status = in_image(server, "print(open('/proc/1/status').read())")
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert fields["Uid"].split()[0] == "10001" and fields["Gid"].split()[0] == "10001"
    assert int(fields["CapEff"], 16) == 0 and int(fields["CapBnd"], 16) == 0


def test_root_filesystem_is_read_only_even_in_tmp(server: Container) -> None:
    script = (
        "import errno\n"
        "for path in ('/tmp/x', '/venv/x', '/app/ranges/x'):\n"
        "    try:\n"
        "        open(path, 'w')\n"
        "    except OSError as exc:\n"
        "        print(path, errno.errorcode[exc.errno])\n"
    )
    assert in_image(server, script).split() == ["/tmp/x", "EROFS", "/venv/x", "EROFS", "/app/ranges/x", "EROFS"]


def test_two_workers_start_without_a_writable_tmp(podman: Podman, image: str) -> None:
    # `docker run --read-only` has no tmpfs on /tmp either.
    with running_container(podman, image, unique("workers"), port=free_port(), admin_port=free_port(),
                           flags=HARDENED, args=("serve", "--workers", "2")) as container:
        container.wait_ready()
        assert http_get(container.url + "/v2/")[0] == 200


@pytest.fixture(scope="module")
def stopped_run(podman: Podman, image: str) -> tuple[int, str]:
    """A server run to its end: started verbose (imports logged), served, then `podman stop`.

    (exit status, log). `podman stop` sends SIGTERM and SIGKILLs after
    STOP_TIMEOUT seconds: status 137 would mean it did not stop by itself.
    """
    with running_container(podman, image, unique("stop"), port=free_port(), admin_port=free_port(),
                           flags=HARDENED, env={"PYTHONVERBOSE": "1", "ARCHEIO_GRACE_PERIOD": str(GRACE_PERIOD)},
                           ) as container:
        container.wait_ready()
        assert http_get(container.url + "/v2/")[0] == 200
        podman("stop", "--time", str(STOP_TIMEOUT), container.name, timeout=STOP_TIMEOUT + 60)
        return podman.exit_code(container.name), podman.logs(container.name)


def test_sigterm_stops_the_server_with_status_0_within_the_grace_period(stopped_run: tuple[int, str]) -> None:
    status, log = stopped_run
    assert status == 0, log[-3000:]


def test_every_module_the_server_imports_comes_from_shipped_bytecode(stopped_run: tuple[int, str]) -> None:
    # Python -v logs "code object from <file>.py" for each module it compiles
    # (and "from '<file>.pyc'" for bytecode it loads); nothing can be
    # written back on a read-only root, so each start would pay again.
    _, log = stopped_run
    loaded = re.findall(r"^# code object from '(\S+\.pyc)'$", log, re.M)
    compiled = re.findall(r"^# code object from (\S+\.py)$", log, re.M)
    assert any("/venv/" in path and "/archeio/" in path for path in loaded), "no archeio module was logged"
    assert compiled == []


# -- what the image holds ------------------------------------------------------------


def test_image_has_no_compiler(server: Container) -> None:
    found = in_image(server, "import shutil; print([c for c in ('gcc', 'cc', 'c++', 'clang', 'cpp', 'ld') "
                             "if shutil.which(c)])")
    assert found.strip() == "[]"


def test_venv_holds_no_pip_setuptools_or_boto3(server: Container) -> None:
    script = ("import importlib.util, json; print(json.dumps({name: importlib.util.find_spec(name) is not None "
              "for name in ('pip', 'setuptools', 'boto3', 'botocore', 'aiohttp', 'archeio')}))")
    found = json.loads(server.exec("/venv/bin/python", "-c", script).stdout)
    assert found == {"pip": False, "setuptools": False, "boto3": False, "botocore": False,
                     "aiohttp": True, "archeio": True}


def test_image_ships_no_tests_or_sources_tree(server: Container) -> None:
    # Our own test modules by name (aiohttp's test_utils.py is a library module).
    ours = sorted({path.name for path in REPO.glob("tests/**/test_*.py")})
    script = (
        "import os, json, sys\n"
        "ours = set(json.loads(sys.argv[1]))\n"
        "found = []\n"
        "for top in ('/venv', '/app'):\n"
        "    for root, dirs, files in os.walk(top):\n"
        "        found += [os.path.join(root, d) for d in dirs if d in ('test', 'tests')]\n"
        "        found += [os.path.join(root, f) for f in files if f == 'conftest.py' or f in ours]\n"
        "print(json.dumps({'tests': found, 'src': os.path.exists('/src')}))\n"
    )
    result = server.exec("python", "-c", script, json.dumps(ours))
    assert json.loads(result.stdout) == {"tests": [], "src": False}


def test_mirror_command_without_its_extra_says_what_to_install(podman: Podman, image: str) -> None:
    status, output = run_to_completion(podman, image, "mirror", "--source", "https://registry.example", "pause")
    assert status == 2
    assert output.strip() == (
        "archeio mirror: needs boto3 and botocore, which the server leaves out: pip install 'archeio[mirror]'"
    )
