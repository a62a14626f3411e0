"""The Kubernetes Deployment's pod, run by `podman kube play`: server, init container and sidecar.

The Deployment is rendered from the Google load balancer overlay by kubectl
1.20's kustomize, as a user applies it, then adapted to podman here and
only as follows:
- the image: this session's build, for all three containers;
- the host's network with free loopback ports (podman refuses container
  ports with it, so they go; PORT and ARCHEIO_ADMIN_PORT move);
- restartPolicy OnFailure: podman 4.3 restarts a finished init container
  under Always and then fails to remove it (podman issues 16343, 18477);
- the sidecar's https_proxy points at a closed loopback port, so the feeds
  are unreachable on every machine, not only on these.
Everything else (commands, volumes, security contexts, the sidecar's
signal handling, the grace period) is the manifest's own.

The tests run in file order: the last one stops the pod.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from ..conftest import GOOGLE_CLOUD, free_port
from ..deploy_support import OLDEST_MINOR, by_kind, container, env_of, kubectls, pod_spec, render
from ..integration.services import MissingTool, wait_until
from ..ops_support import BLOB, http_get, scrape, total, xff
from .podman import Container, Podman, podman_messages

pytestmark = [pytest.mark.container, pytest.mark.timeout(1800)]

OVERLAY = "google-lb"
NAME = "archeio-pod-test"
POD = f"{NAME}-pod-0"  # what podman names the pod of a Deployment
SIDECAR = "ranges-updater"


def podman_deployment(image: str, port: int, admin_port: int, closed_port: int) -> dict[str, Any]:
    """The rendered Deployment with only the changes the module docstring lists."""
    try:
        kubectl = kubectls()[OLDEST_MINOR]
    except MissingTool as exc:
        pytest.fail(str(exc), pytrace=False)
    deployment = by_kind(render(kubectl, OVERLAY))["Deployment"]
    deployment["metadata"]["name"] = NAME
    spec = deployment["spec"]["template"]["spec"]
    spec["hostNetwork"] = True
    spec["restartPolicy"] = "OnFailure"
    for each in spec["containers"] + spec["initContainers"]:
        each["image"] = image
        each.pop("ports", None)
    moved = {"PORT": str(port), "ARCHEIO_ADMIN_PORT": str(admin_port),
             "ARCHEIO_HOST": "127.0.0.1", "ARCHEIO_ADMIN_HOST": "127.0.0.1"}
    server = container(spec, "archeio")
    server["env"] = [e for e in server["env"] if e["name"] not in moved]
    server["env"] += [{"name": k, "value": v} for k, v in moved.items()]
    sidecar = container(spec, SIDECAR)
    sidecar["env"] = [*sidecar.get("env", []), {"name": "https_proxy", "value": f"http://127.0.0.1:{closed_port}"}]
    return deployment


@pytest.fixture(scope="module")
def deployment(image: str) -> dict[str, Any]:
    return podman_deployment(image, free_port(), free_port(), free_port())


@pytest.fixture(scope="module")
def pod(podman: Podman, deployment: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    manifest = tmp_path_factory.mktemp("kube") / "deployment.yaml"
    manifest.write_text(yaml.safe_dump(deployment))
    env = env_of(container(deployment["spec"]["template"]["spec"], "archeio"))
    server = Container(podman, f"{POD}-archeio", int(env["PORT"]), int(env["ARCHEIO_ADMIN_PORT"]))
    podman("kube", "play", str(manifest), timeout=300)
    try:
        server.wait_ready()
        yield server
    finally:
        podman("pod", "rm", "--force", POD, check=False)


def test_pod_serves_blob_redirects_from_the_seeded_ranges(pod: Container) -> None:
    # A Google Cloud client goes upstream only if the server knows Google's
    # ranges: the init container's copy in the shared emptyDir.
    status, headers, _ = http_get(f"{pod.url}/v2/pause/blobs/{BLOB}", headers=xff(GOOGLE_CLOUD))
    assert status == 307
    assert headers["Location"] == f"https://us-central1-docker.pkg.dev/v2/k8s-artifacts-prod/images/pause/blobs/{BLOB}"


def test_pod_is_ready_with_every_expected_providers_ranges_in_each_worker(pod: Container) -> None:
    # Readiness means the routing data is there: Google Cloud's, and AWS's
    # (the built-in mirror table's cloud), in both workers, as the metric an
    # alert watches says.
    assert http_get(pod.admin_url + "/readyz")[0] == 200
    samples = scrape(pod)  # type: ignore[arg-type]
    for worker in ("0", "1"):
        for cloud in ("AWS", "GCP"):
            assert total(samples, "archeio_ranges_prefixes", cloud=cloud, worker=worker) > 0, (cloud, worker)


def test_pod_loads_azure_from_the_seeded_ranges(pod: Container) -> None:
    # Azure's file comes from the image (the embedded data): the sidecar
    # fetches AWS and Google Cloud only, so it is what the server routes by.
    samples = scrape(pod)  # type: ignore[arg-type]
    assert total(samples, "archeio_ranges_prefixes", cloud="Azure") > 1000


def test_ranges_sidecar_keeps_its_files_and_says_so_when_the_feeds_are_unreachable(
    podman: Podman, pod: Container,
) -> None:
    def first_update() -> str | None:
        log = podman.logs(f"{POD}-{SIDECAR}")
        return log if log.count("kept /ranges/") >= 2 else None

    said = wait_until(first_update, what="the sidecar's first update", timeout=120)
    assert "kept /ranges/aws-ip-ranges.json" in said and "kept /ranges/gcp-cloud.json" in said, said
    assert "azure" not in said.lower(), said  # no Azure URL given: its file is not the sidecar's business
    names = "['aws-ip-ranges.json', 'azure-service-tags.json', 'gcp-cloud.json']"
    same = pod.exec("python", "-c", f"import filecmp, sys; names = {names};"
                    "sys.exit(filecmp.cmpfiles('/ranges', '/app/ranges', names, shallow=False)[0] != names)")
    assert same.returncode == 0, podman_messages(same.stderr)


def load_balancer_health_checks() -> dict[str, tuple[str, int]]:
    """(path, port) of the load balancer's health check in the rendered overlay: Ingress's and Gateway's."""
    found = by_kind(render(kubectls()[OLDEST_MINOR], OVERLAY))
    backend = found["BackendConfig"]["spec"]["healthCheck"]
    policy = found["HealthCheckPolicy"]["spec"]["default"]["config"]["httpHealthCheck"]
    return {"BackendConfig": (backend["requestPath"], backend["port"]),
            "HealthCheckPolicy": (policy["requestPath"], policy["port"])}


@pytest.mark.parametrize("kind", ["BackendConfig", "HealthCheckPolicy"])
def test_load_balancer_health_check_answers_200_in_the_pod(pod: Container, kind: str) -> None:
    """The check as Google's prober sends it: its path, on the container port it names."""
    path, port = load_balancer_health_checks()[kind]
    # The pod here serves on a free port instead of the manifest's PORT (the
    # module docstring): the check's port must be the one PORT names, and is
    # then reached where PORT was moved to.
    rendered_server = container(pod_spec(render(kubectls()[OLDEST_MINOR], OVERLAY)), "archeio")
    assert port == int(env_of(rendered_server)["PORT"]), f"{kind} checks port {port}, not the serving port"
    status, headers, _ = http_get(f"{pod.url}{path}", headers={"User-Agent": "GoogleHC/1.0"})
    assert status == 200
    assert headers["Docker-Distribution-Api-Version"] == "registry/2.0"


def test_pod_stops_cleanly_on_sigterm(podman: Podman, pod: Container, deployment: dict[str, Any]) -> None:
    """Every container exits by itself, status 0: a SIGKILL at the end of the grace period gives 137."""
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    started = time.monotonic()
    podman("pod", "stop", "--time", str(grace), POD, timeout=grace + 60)
    took = time.monotonic() - started
    statuses = {name: podman.exit_code(f"{POD}-{name}") for name in ("archeio", SIDECAR)}
    print(f"pod stopped in {took:.1f} s (drain delay included); exit statuses {statuses}")
    assert statuses == {"archeio": 0, SIDECAR: 0}
