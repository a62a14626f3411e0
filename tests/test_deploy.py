"""The deploy files, checked without a cluster (tests/container/ builds and runs them).

- Kubernetes: every kustomize overlay and example rendered by kubectl
  1.20's built-in kustomize, alike with a current kubectl, passes strict
  validation against its kinds' published schemas (`kubernetes-validate
  --strict` for Kubernetes' own kinds, tests/crd_validate.cjs for GKE's and
  the Gateway API's; a misspelled field must fail each, so the check is
  real); plus what the schemas cannot know: the load balancer's health
  check (BackendConfig, HealthCheckPolicy) on the serving port and a path
  answering 200, attached to the Service; each overlay's X-Forwarded-For trust,
  the image named once, no `replicas:` beside the autoscaler, the memory
  arithmetic, tolerant probes, a sidecar that ends on SIGTERM, probes on
  the admin port, the hardening, a grace period covering drain and grace.
- Cloud Run: one service per region of deploy/cloudrun/regions.toml, the
  committed files exactly what render.py makes of it; each pins its region,
  that region's upstream and default mirror; ingress only through the load
  balancer; the image by digest (a placeholder, filled in by the renderer,
  which refuses a tag); Knative's published schema, strictly; required
  fields, the port, probes on a path our server answers 200, shutdown
  within Cloud Run's 10 s; the metrics sidecar scraping the admin port.
- Cloud Armor (docs/operations.md): the policy's path filter lets through
  every path the server serves, referrers and /privacy/... included.
- Every environment variable in both is a row of archeio.config.SETTINGS,
  with a value that setting accepts.
- Dockerfile: multi-stage, non-root numeric USER, no compilers or package
  installs in the final stage, hash-checked installs, a healthcheck on the
  admin port; the docs name its base image.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from archeio.config import SETTINGS, load_settings
from archeio.routing import NOT_FOUND, LocalAnswer, Router

from .deploy_support import (
    EXAMPLES,
    KUBERNETES,
    OLDEST_MINOR,
    OVERLAYS,
    REPO,
    by_kind,
    container,
    custom_kinds,
    env_of,
    kind_of,
    kubectls,
    pod_spec,
    render,
    strict_validate,
    validate_custom,
)
from .integration.services import MissingTool, wait_until

DEPLOY = REPO / "deploy"
BASE = KUBERNETES / "base"
BASE_DEPLOYMENT = BASE / "deployment.yaml"
CLOUD_RUN_SERVICES = DEPLOY / "cloudrun" / "services"
REGIONS = DEPLOY / "cloudrun" / "regions.toml"
RENDERER = DEPLOY / "cloudrun" / "render.py"
RUN_MONITORING = DEPLOY / "cloudrun" / "run-monitoring.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
OPERATIONS_DOC = REPO / "docs" / "operations.md"
SETTING_BY_ENV = {s.env: s for s in SETTINGS}
# Settings whose value names a path that exists only inside the container.
_PATH_SETTINGS = {"ranges_dir", "mirrors_file"}
# What each front puts in X-Forwarded-For after the client (see each overlay's patch).
TRUSTED_HOPS = {"google-lb": "1", "ingress-nginx": "0"}


def kubernetes_validate(*files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", *map(str, files)],
        capture_output=True, text=True, timeout=120,
    )


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.fixture(scope="module")
def renderers() -> dict[int, str]:
    try:
        return kubectls()
    except MissingTool as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="module")
def rendered(renderers: dict[int, str]) -> dict[str, list[dict[str, Any]]]:
    """Each overlay as kubectl 1.20 renders it."""
    return {overlay: render(renderers[OLDEST_MINOR], overlay) for overlay in OVERLAYS}


def deployment_of(rendered: dict[str, list[dict[str, Any]]], overlay: str = "google-lb") -> dict[str, Any]:
    return by_kind(rendered[overlay])["Deployment"]


def server_of(rendered: dict[str, list[dict[str, Any]]], overlay: str = "google-lb") -> dict[str, Any]:
    return container(pod_spec(rendered[overlay]), "archeio")


# -- Kubernetes: rendering and schemas -----------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_alike_with_kubectl_1_20_and_current_kustomize(
    renderers: dict[int, str], overlay: str,
) -> None:
    renderings = {minor: render(path, overlay) for minor, path in renderers.items()}
    key = sorted(renderings)
    assert all(renderings[minor] == renderings[key[0]] for minor in key), f"kubectl 1.{key} render differently"


@pytest.fixture(scope="module")
def examples(renderers: dict[int, str]) -> dict[str, list[dict[str, Any]]]:
    """Each example (an overlay and its front) as kubectl 1.20 renders it."""
    return {example: render(renderers[OLDEST_MINOR], example, "examples") for example in EXAMPLES}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_overlay_passes_strict_schema_validation(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, tmp_path: Path,
) -> None:
    docs = rendered[overlay]
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= set(by_kind(docs))
    assert strict_validate(docs, tmp_path) == []


def test_strict_validation_rejects_a_misspelled_field(tmp_path: Path) -> None:
    broken = tmp_path / "deployment.yaml"
    broken.write_text(BASE_DEPLOYMENT.read_text().replace("readinessProbe", "readynessProbe"))
    assert kubernetes_validate(broken).returncode != 0


def test_strict_validation_refuses_a_kind_without_a_schema(tmp_path: Path) -> None:
    # kubernetes-validate alone passes an unknown kind with a warning.
    unknown = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {"size": 1}}
    assert strict_validate([unknown], tmp_path) != []


@pytest.mark.parametrize("example", EXAMPLES)
def test_example_renders_alike_with_kubectl_1_20_and_current_kustomize(
    renderers: dict[int, str], example: str,
) -> None:
    renderings = {minor: render(path, example, "examples") for minor, path in renderers.items()}
    assert all(docs == renderings[OLDEST_MINOR] for docs in renderings.values())


@pytest.mark.parametrize("example", EXAMPLES)
def test_rendered_example_passes_strict_schema_validation(
    examples: dict[str, list[dict[str, Any]]], example: str, tmp_path: Path,
) -> None:
    assert strict_validate(examples[example], tmp_path) == []


# API groups of Kubernetes' own kinds (and kustomize's file), which kubernetes-validate knows;
# and the Cloud Run metrics sidecar's configuration, a file in the shape of a custom
# resource that is never sent to an API server (checked field by field below).
_BUILTIN_GROUPS = ("v1", "apps/", "autoscaling/", "policy/", "batch/", "networking.k8s.io/",
                   "kustomize.config.k8s.io/", "monitoring.googleapis.com/")


def _custom_documents() -> list[tuple[str, dict[str, Any]]]:
    """(kind, document) of every custom kind written in deploy/, one document each."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(DEPLOY.rglob("*.yaml")):
        for doc in load_all(path):
            if isinstance(doc, dict) and not str(doc.get("apiVersion", "v1")).startswith(_BUILTIN_GROUPS):
                found.setdefault(kind_of(doc), doc)
    return sorted(found.items())


def _misspell(doc: dict[str, Any]) -> dict[str, Any]:
    """`doc` with the first field of its spec misspelled (a trailing "x"), as a user might."""
    spec = doc["spec"]
    key = sorted(spec)[0]
    spec[key + "x"] = spec.pop(key)
    return doc


@pytest.fixture(scope="module")
def misspelled() -> dict[str, list[str]]:
    """The custom validator's verdict on each custom kind of deploy/, one field misspelled in each."""
    broken = [_misspell(yaml.safe_load(yaml.safe_dump(doc))) for kind, doc in _custom_documents()
              if kind in custom_kinds()]
    failures = validate_custom(broken)
    return {kind_of(doc): [f for f in failures if f.startswith(kind_of(doc) + " ")] for doc in broken}


def test_every_custom_kind_in_deploy_has_a_schema() -> None:
    kinds = {kind for kind, _ in _custom_documents()}
    assert kinds >= {"cloud.google.com/v1 BackendConfig", "networking.gke.io/v1 HealthCheckPolicy",
                     "gateway.networking.k8s.io/v1 Gateway", "gateway.networking.k8s.io/v1 HTTPRoute"}
    assert kinds <= custom_kinds(), kinds - custom_kinds()


@pytest.mark.parametrize("kind", [kind for kind, _ in _custom_documents()])
def test_strict_validation_rejects_a_misspelled_field_of_each_custom_kind(
    misspelled: dict[str, list[str]], kind: str,
) -> None:
    assert any("does not exist in type" in failure for failure in misspelled[kind]), misspelled[kind]


# -- Kubernetes: Google's load balancer (overlay google-lb) ----------------------------


def health_checks(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The load balancer's health check as each of BackendConfig and HealthCheckPolicy states it."""
    found = by_kind(docs)
    backend = found["BackendConfig"]["spec"]["healthCheck"]
    policy = found["HealthCheckPolicy"]["spec"]["default"]
    http = policy["config"]["httpHealthCheck"]
    assert policy["config"]["type"] == backend["type"] == "HTTP"
    assert http["portSpecification"] == "USE_FIXED_PORT"
    return {
        "BackendConfig": {key: backend[key] for key in ("requestPath", "port", "checkIntervalSec", "timeoutSec",
                                                          "healthyThreshold", "unhealthyThreshold")},
        "HealthCheckPolicy": {"requestPath": http["requestPath"], "port": http["port"],
                              **{key: policy[key] for key in ("checkIntervalSec", "timeoutSec",
                                                              "healthyThreshold", "unhealthyThreshold")}},
    }


def test_load_balancer_health_checks_ask_the_serving_port_for_a_path_answering_200(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    server = server_of(rendered)
    serving = {p["name"]: p["containerPort"] for p in server["ports"]}["http"]
    assert serving == int(env_of(server)["PORT"])
    router = Router(load_settings(env={}))
    for kind, check in health_checks(rendered["google-lb"]).items():
        assert check["port"] == serving, kind
        answer = router.classify("GET", check["requestPath"])
        assert isinstance(answer, LocalAnswer) and answer.status == 200, kind


def test_ingress_and_gateway_health_checks_agree(rendered: dict[str, list[dict[str, Any]]]) -> None:
    checks = health_checks(rendered["google-lb"])
    assert checks["BackendConfig"] == checks["HealthCheckPolicy"]
    check = checks["BackendConfig"]
    # Google's health checks refuse a timeout longer than the interval.
    assert check["timeoutSec"] <= check["checkIntervalSec"]


def test_health_checks_are_attached_to_the_service(rendered: dict[str, list[dict[str, Any]]]) -> None:
    found = by_kind(rendered["google-lb"])
    service = found["Service"]
    annotations = service["metadata"]["annotations"]
    assert json.loads(annotations["cloud.google.com/backend-config"]) == {
        "default": found["BackendConfig"]["metadata"]["name"],
    }
    assert json.loads(annotations["cloud.google.com/neg"]) == {"ingress": True}
    target = found["HealthCheckPolicy"]["spec"]["targetRef"]
    assert target == {"group": "", "kind": "Service", "name": service["metadata"]["name"]}


def test_only_the_google_lb_overlay_carries_google_s_health_checks(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    for overlay in OVERLAYS:
        kinds = set(by_kind(rendered[overlay]))
        assert ({"BackendConfig", "HealthCheckPolicy"} <= kinds) == (overlay == "google-lb"), overlay


def test_ingress_example_sends_every_path_to_the_service(examples: dict[str, list[dict[str, Any]]]) -> None:
    found = by_kind(examples["google-lb-ingress"])
    ingress, service = found["Ingress"], found["Service"]
    assert ingress["metadata"]["annotations"]["kubernetes.io/ingress.class"] == "gce"
    backend = ingress["spec"]["defaultBackend"]["service"]
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
    assert "rules" not in ingress["spec"]
    certificate = found["ManagedCertificate"]["metadata"]["name"]
    assert ingress["metadata"]["annotations"]["networking.gke.io/managed-certificates"] == certificate


def test_gateway_example_is_a_global_external_load_balancer_routing_to_the_service(
    examples: dict[str, list[dict[str, Any]]],
) -> None:
    found = by_kind(examples["google-lb-gateway"])
    gateway, route, service = found["Gateway"], found["HTTPRoute"], found["Service"]
    # GKE's classes of the global external Application Load Balancer.
    assert gateway["spec"]["gatewayClassName"] in {"gke-l7-global-external-managed", "gke-l7-gxlb"}
    (parent,) = route["spec"]["parentRefs"]
    assert parent["name"] == gateway["metadata"]["name"]
    assert parent["sectionName"] in {listener["name"] for listener in gateway["spec"]["listeners"]}
    (rule,) = route["spec"]["rules"]
    assert "matches" not in rule  # every path: the server answers each one itself
    (backend,) = rule["backendRefs"]
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"] in {p["port"] for p in service["spec"]["ports"]}


# -- Kubernetes: the front, the image, the replica count -------------------------------


def test_every_overlay_is_a_known_front() -> None:
    assert set(OVERLAYS) == set(TRUSTED_HOPS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_trusts_the_hops_its_front_appends(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    assert env_of(server_of(rendered, overlay))["ARCHEIO_TRUSTED_HOPS"] == TRUSTED_HOPS[overlay]


def test_base_leaves_trusted_hops_to_the_overlays() -> None:
    (deployment,) = [doc for doc in load_all(BASE_DEPLOYMENT) if doc["kind"] == "Deployment"]
    assert "ARCHEIO_TRUSTED_HOPS" not in env_of(container(deployment["spec"]["template"]["spec"], "archeio"))


# Upstream's per-client limit at Cloud Armor (kubernetes/k8s.io, oci-proxy's
# cloud-armor.tf since #7070): 2,490 requests per client address in a 30 s window.
UPSTREAM_WINDOW_REQUESTS, UPSTREAM_WINDOW_SECONDS = 2490, 30
# Which overlays limit clients in the server: the others have an edge limit in front.
SERVER_RATE_LIMIT = {"google-lb": False, "ingress-nginx": True}


def test_every_overlay_says_whether_the_server_limits_clients() -> None:
    assert set(OVERLAYS) == set(SERVER_RATE_LIMIT)


@pytest.mark.parametrize("overlay", [name for name, on in SERVER_RATE_LIMIT.items() if not on])
def test_overlay_with_an_edge_limit_leaves_the_servers_limit_off(
    rendered: dict[str, list[dict[str, Any]]], overlay: str,
) -> None:
    assert env_of(server_of(rendered, overlay)).get("ARCHEIO_RATE_LIMIT", "0") == "0"


@pytest.mark.parametrize("overlay", [name for name, on in SERVER_RATE_LIMIT.items() if on])
def test_overlay_limits_each_client_at_upstreams_rate_with_the_fewest_pods(
    rendered: dict[str, list[dict[str, Any]]], overlay: str,
) -> None:
    # The limit holds per worker; each pod gets a share of a client's
    # requests, and in a pod at least one worker sees them (the overlay's
    # patch says why): at the autoscaler's minimum, the pods' workers together
    # allow a client upstream's rate and window count, rounded up to whole
    # requests a second and no more.
    env = env_of(server_of(rendered, overlay))
    pods = by_kind(rendered[overlay])["HorizontalPodAutoscaler"]["spec"]["minReplicas"]
    rate, burst = float(env["ARCHEIO_RATE_LIMIT"]), int(env["ARCHEIO_RATE_BURST"])
    upstream_rate = UPSTREAM_WINDOW_REQUESTS / UPSTREAM_WINDOW_SECONDS
    assert upstream_rate <= rate * pods < upstream_rate + pods
    assert UPSTREAM_WINDOW_REQUESTS <= burst * pods < UPSTREAM_WINDOW_REQUESTS + pods


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_image_is_named_once_and_set_on_every_container(
    rendered: dict[str, list[dict[str, Any]]], overlay: str,
) -> None:
    (image,) = yaml.safe_load((BASE / "kustomization.yaml").read_text())["images"]
    spec = pod_spec(rendered[overlay])
    images = {c["name"]: c["image"] for c in spec["containers"] + spec["initContainers"]}
    assert images == dict.fromkeys(images, f"{image['newName']}:{image['newTag']}")
    assert len(images) == 3


def test_deployment_leaves_the_replica_count_to_the_autoscaler(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for overlay in OVERLAYS:
        found = by_kind(rendered[overlay])
        target = found["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
        assert target["name"] == found["Deployment"]["metadata"]["name"]
        assert "replicas" not in found["Deployment"]["spec"], overlay


# -- Kubernetes: memory, probes, the sidecar -------------------------------------------


def memory_bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 10**3, "M": 10**6, "G": 10**9}
    number, unit = re.fullmatch(r"(\d+)([A-Za-z]*)", quantity).groups()  # type: ignore[union-attr]
    return int(number) * units.get(unit, 1)


def memory_arithmetic() -> dict[str, int]:
    """The figures of the "Memory arithmetic" comment at the top of base/deployment.yaml."""
    text = BASE_DEPLOYMENT.read_text()
    figures = {
        "bytes_per_entry": r"bytes per cache entry: (\d+)",
        "fallback_bytes_per_entry": r"bytes per cache entry with the signature fallback: (\d+)",
        "idle_worker_mb": r"idle worker MB: (\d+)",
        "supervisor_mb": r"supervisor MB: (\d+)",
        "stated_need_mb": r"= (\d+) MB\s*$",
        "stated_fallback_need_mb": r"need with the signature fallback .*\n#\s+= .*= (\d+) MB\s*$",
    }
    found = {name: re.search(pattern, text, re.M) for name, pattern in figures.items()}
    missing = [name for name, match in found.items() if match is None]
    assert not missing, f"base/deployment.yaml's memory arithmetic lacks {missing}"
    return {name: int(match.group(1)) for name, match in found.items() if match}


def memory_need(figures: dict[str, int], env: dict[str, str], bytes_per_entry: int) -> int:
    """Bytes the comment's formula gives for this environment and this cost of a cache entry."""
    workers, cache_size = int(env["ARCHEIO_WORKERS"]), int(env["ARCHEIO_CACHE_SIZE"])
    per_worker = figures["idle_worker_mb"] * 10**6 + 2 * cache_size * bytes_per_entry
    return workers * per_worker + figures["supervisor_mb"] * 10**6


def signature_fallback(env: dict[str, str]) -> bool:
    """Does this environment turn the signature fallback on (archeio.config's rule)?"""
    registries = {k: env[k] for k in ("UPSTREAM_REGISTRY_ENDPOINT", "SIGNATURE_UPSTREAM_ENDPOINT") if k in env}
    return load_settings(env=registries).signature_fallback


def test_memory_request_covers_every_workers_idle_size_and_full_caches(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    figures = memory_arithmetic()
    server = server_of(rendered)
    env = env_of(server)
    need = memory_need(figures, env, figures["bytes_per_entry"])
    assert round(need / 10**6) == figures["stated_need_mb"], "the comment's total does not follow from its figures"
    if signature_fallback(env):  # entries keyed by repository: the larger figure applies
        need = memory_need(figures, env, figures["fallback_bytes_per_entry"])
    requests, limits = server["resources"]["requests"], server["resources"]["limits"]
    assert memory_bytes(requests["memory"]) >= need
    assert memory_bytes(limits["memory"]) >= memory_bytes(requests["memory"])


def test_memory_need_with_the_signature_fallback_follows_from_its_figures(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    figures = memory_arithmetic()
    assert figures["fallback_bytes_per_entry"] >= figures["bytes_per_entry"]
    need = memory_need(figures, env_of(server_of(rendered)), figures["fallback_bytes_per_entry"])
    assert round(need / 10**6) == figures["stated_fallback_need_mb"]
    # What the comment tells an operator who turns it on must cover it.
    advice = re.search(r"raise the request to (\d+Mi) and the limit to (\d+Mi)", BASE_DEPLOYMENT.read_text())
    assert advice is not None and memory_bytes(advice[1]) >= need and memory_bytes(advice[2]) >= memory_bytes(advice[1])


def test_readiness_probe_tolerates_a_slow_or_missed_answer(rendered: dict[str, list[dict[str, Any]]]) -> None:
    server = server_of(rendered)
    readiness = server["readinessProbe"]
    assert readiness["failureThreshold"] >= 2
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[kind].get("timeoutSeconds", 1) >= 2, kind


@pytest.mark.parametrize("phase", ["updating", "sleeping"])
def test_ranges_updater_ends_with_status_0_on_sigterm(
    rendered: dict[str, list[dict[str, Any]]], phase: str, tmp_path: Path,
) -> None:
    """The sidecar's own shell script, with an `iprange` that hangs (a slow feed) or returns at once."""
    command = container(pod_spec(rendered["google-lb"]), "ranges-updater")["command"]
    assert command[:2] == ["sh", "-c"]
    started = tmp_path / "started"
    stub = tmp_path / "bin" / "iprange"
    stub.parent.mkdir()
    stub.write_text(f"#!/bin/sh\ntouch {started}\n" + ("exec sleep 600\n" if phase == "updating" else ""))
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}"}
    shell = subprocess.Popen(["/bin/sh", "-c", command[2]], env=env, start_new_session=True)

    def looping() -> bool:
        assert shell.poll() is None, "the loop ended by itself"
        return started.exists()

    try:
        wait_until(looping, what="the first `iprange update`")
        shell.send_signal(signal.SIGTERM)  # what the kubelet sends to the container's PID 1
        assert shell.wait(timeout=30) == 0
    finally:
        # The stub and `sleep` are left behind (in a container they would die with PID 1).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shell.pid, signal.SIGKILL)
        shell.wait()


def test_probes_use_the_admin_port_and_its_endpoints(rendered: dict[str, list[dict[str, Any]]]) -> None:
    server = server_of(rendered)
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports["admin"] == int(env_of(server)["ARCHEIO_ADMIN_PORT"])
    assert ports["http"] == int(env_of(server)["PORT"])
    probes = {kind: server[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert all(probe["port"] == "admin" for probe in probes.values())
    assert probes["readinessProbe"]["path"] == "/readyz" and probes["livenessProbe"]["path"] == "/healthz"


def test_service_exposes_only_the_public_port(rendered: dict[str, list[dict[str, Any]]]) -> None:
    service = by_kind(rendered["google-lb"])["Service"]
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]


def test_pods_are_hardened_and_spread(rendered: dict[str, list[dict[str, Any]]]) -> None:
    pod = pod_spec(rendered["google-lb"])
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    for each in pod["containers"] + pod.get("initContainers", []):
        context = each["securityContext"]
        assert context["readOnlyRootFilesystem"] is True and context["runAsNonRoot"] is True
        assert context["allowPrivilegeEscalation"] is False and context["capabilities"]["drop"] == ["ALL"]
        assert {"requests", "limits"} <= set(each["resources"])
    assert {c["topologyKey"] for c in pod["topologySpreadConstraints"]} == {
        "topology.kubernetes.io/zone", "kubernetes.io/hostname",
    }


def test_termination_grace_covers_drain_and_in_flight_requests(rendered: dict[str, list[dict[str, Any]]]) -> None:
    env = env_of(server_of(rendered))
    needed = float(env["ARCHEIO_DRAIN_DELAY"]) + float(env["ARCHEIO_GRACE_PERIOD"])
    assert deployment_of(rendered)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > needed


def test_disruption_budget_and_service_select_the_deployments_pods(rendered: dict[str, list[dict[str, Any]]]) -> None:
    found = by_kind(rendered["google-lb"])
    labels = found["Deployment"]["spec"]["selector"]["matchLabels"]
    assert found["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == labels
    assert found["Service"]["spec"]["selector"] == labels


# -- Cloud Run ------------------------------------------------------------------------


def _load_renderer() -> Any:
    """deploy/cloudrun/render.py as a module (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("cloudrun_render", RENDERER)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render_py = _load_renderer()


def run_renderer(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(RENDERER), *args], capture_output=True, text=True, timeout=60)


def region_table() -> dict[str, dict[str, str]]:
    return dict(render_py.load_regions(REGIONS.read_text())[1])


def cloud_run_services() -> dict[str, dict[str, Any]]:
    """Region -> the committed manifest of its service."""
    return {path.stem: load_all(path)[0] for path in sorted(CLOUD_RUN_SERVICES.glob("*.yaml"))}


def cloud_run_containers(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in service["spec"]["template"]["spec"]["containers"]}


@pytest.fixture(scope="module")
def cloud_runs() -> dict[str, dict[str, Any]]:
    return cloud_run_services()


def test_cloud_run_services_are_the_render_of_the_region_table(tmp_path: Path) -> None:
    result = run_renderer("--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    rendered = {path.name: path.read_text() for path in tmp_path.glob("*.yaml")}
    committed = {path.name: path.read_text() for path in CLOUD_RUN_SERVICES.glob("*.yaml")}
    assert sorted(rendered) == sorted(committed), "run `python3 deploy/cloudrun/render.py`"
    stale = [name for name in rendered if rendered[name] != committed[name]]
    assert not stale, f"{stale} differ from the table's render: run `python3 deploy/cloudrun/render.py`"


def test_one_cloud_run_service_per_region_of_the_table(cloud_runs: dict[str, dict[str, Any]]) -> None:
    assert set(cloud_runs) == set(region_table())
    assert len(cloud_runs) >= 20  # upstream's regions, not a sample


def test_each_cloud_run_service_pins_its_region_its_upstream_and_its_default_mirror(
    cloud_runs: dict[str, dict[str, Any]],
) -> None:
    upstream_path = render_py.load_regions(REGIONS.read_text())[0]
    for region, entry in region_table().items():
        service = cloud_runs[region]
        assert service["metadata"]["labels"]["cloud.googleapis.com/location"] == region
        env = env_of(cloud_run_containers(service)["archeio"])
        # Each region pulls manifests from its own Artifact Registry, as upstream's do.
        assert entry["upstream"] == f"https://{region}-docker.pkg.dev"
        assert env["UPSTREAM_REGISTRY_ENDPOINT"] == entry["upstream"]
        assert env["UPSTREAM_REGISTRY_PATH"] == upstream_path
        assert env["DEFAULT_AWS_BASE_URL"] == entry["default_mirror"]


def test_cloud_run_services_take_traffic_only_through_the_load_balancer(
    cloud_runs: dict[str, dict[str, Any]],
) -> None:
    for region, service in cloud_runs.items():
        assert service["metadata"]["annotations"]["run.googleapis.com/ingress"] == \
            "internal-and-cloud-load-balancing", region


def test_committed_cloud_run_services_name_the_image_by_a_digest_placeholder(
    cloud_runs: dict[str, dict[str, Any]],
) -> None:
    for region, service in cloud_runs.items():
        assert cloud_run_containers(service)["archeio"]["image"] == "IMAGE@sha256:DIGEST", region


def test_render_fills_in_the_image_by_digest_and_the_project(tmp_path: Path) -> None:
    image = "us-docker.pkg.dev/my-project/archeio/archeio@sha256:" + "0123456789abcdef" * 4
    result = run_renderer("--image", image, "--project", "my-project", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    for path in tmp_path.glob("*.yaml"):
        server = cloud_run_containers(load_all(path)[0])["archeio"]
        assert server["image"] == image
        assert env_of(server)["ARCHEIO_TRACE_PROJECT"] == "my-project"
    assert len(list(tmp_path.glob("*.yaml"))) == len(region_table())


@pytest.mark.parametrize("image", [
    "us-docker.pkg.dev/my-project/archeio/archeio:latest",
    "us-docker.pkg.dev/my-project/archeio/archeio@sha256:" + "0" * 63,
    "us-docker.pkg.dev/my-project/archeio/archeio@sha256:" + "A" * 64,
])
def test_render_refuses_an_image_not_named_by_digest(image: str, tmp_path: Path) -> None:
    result = run_renderer("--image", image, "--project", "my-project", "--out", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "by digest" in result.stderr
    assert not list(tmp_path.glob("*.yaml"))


@pytest.mark.parametrize(("change", "named"), [
    (lambda text: text.replace('default_mirror = "https://d39mqg4b1dx9z1.cloudfront.net"',
                               'default-mirror = "https://d39mqg4b1dx9z1.cloudfront.net"', 1), "asia-east1"),
    (lambda text: text.replace('"https://us-west2-docker.pkg.dev"', '"http://us-west2-docker.pkg.dev"'), "us-west2"),
    (lambda text: text.replace("[regions.us-east1]", "[regions.US_East]"), "US_East"),
])
def test_render_refuses_a_region_table_off_its_format(change: Any, named: str) -> None:
    with pytest.raises(render_py.TableError, match=named):
        render_py.load_regions(change(REGIONS.read_text()))


def test_cloud_run_services_pass_strict_schema_validation(cloud_runs: dict[str, dict[str, Any]]) -> None:
    # Knative's published schema, which Cloud Run's service YAML follows.
    assert validate_custom(list(cloud_runs.values())) == []


def test_cloud_run_service_has_the_required_shape(cloud_runs: dict[str, dict[str, Any]]) -> None:
    for region, service in cloud_runs.items():
        assert service["apiVersion"] == "serving.knative.dev/v1" and service["kind"] == "Service"
        assert service["metadata"]["name"]
        template = service["spec"]["template"]
        annotations = template["metadata"]["annotations"]
        low = int(annotations["autoscaling.knative.dev/minScale"])
        high = int(annotations["autoscaling.knative.dev/maxScale"])
        assert 1 <= low <= high, region
        assert template["spec"]["containerConcurrency"] == 1000
        containers = cloud_run_containers(service)
        assert containers["archeio"]["args"] == ["serve"]
        # One ingress container: the only one with a port.
        assert [name for name, c in containers.items() if c.get("ports")] == ["archeio"]


def test_cloud_run_port_and_probes_reach_an_endpoint_that_answers_200(
    cloud_runs: dict[str, dict[str, Any]],
) -> None:
    router = Router(load_settings(env={}))
    for region, service in cloud_runs.items():
        each = cloud_run_containers(service)["archeio"]
        (port,) = each["ports"]
        assert port["containerPort"] == int(SETTING_BY_ENV["PORT"].default)
        # Cloud Run sets PORT itself and refuses it in env.
        assert "PORT" not in env_of(each)
        for kind in ("startupProbe", "livenessProbe"):
            probe = each[kind]["httpGet"]
            assert probe["port"] == port["containerPort"], region
            answer = router.classify("GET", probe["path"])
            assert isinstance(answer, LocalAnswer) and answer.status == 200, region


def test_cloud_run_shutdown_fits_in_its_10_seconds(cloud_runs: dict[str, dict[str, Any]]) -> None:
    for region, service in cloud_runs.items():
        env = env_of(cloud_run_containers(service)["archeio"])
        assert float(env["ARCHEIO_DRAIN_DELAY"]) + float(env["ARCHEIO_GRACE_PERIOD"]) < 10, region


def test_cloud_run_metrics_sidecar_scrapes_the_servers_admin_port(cloud_runs: dict[str, dict[str, Any]]) -> None:
    (monitoring,) = load_all(RUN_MONITORING)
    assert (monitoring["apiVersion"], monitoring["kind"]) == ("monitoring.googleapis.com/v1beta", "RunMonitoring")
    (endpoint,) = monitoring["spec"]["endpoints"]
    assert set(endpoint) == {"port", "path", "interval"}
    assert endpoint["path"] == "/metrics"  # archeio/admin.py serves it there
    for region, service in cloud_runs.items():
        containers = cloud_run_containers(service)
        assert endpoint["port"] == int(env_of(containers["archeio"])["ARCHEIO_ADMIN_PORT"]), region
        # The sidecar reads its configuration at /etc/rungmp/config.yaml: the secret's file.
        (mount,) = containers["collector"]["volumeMounts"]
        volumes = {v["name"]: v for v in service["spec"]["template"]["spec"]["volumes"]}
        (item,) = volumes[mount["name"]]["secret"]["items"]
        assert f"{mount['mountPath']}/{item['path']}" == "/etc/rungmp/config.yaml"
        annotations = service["spec"]["template"]["metadata"]["annotations"]
        assert json.loads(annotations["run.googleapis.com/container-dependencies"]) == {"collector": ["archeio"]}
        # Scrapes happen between requests: CPU must stay allocated then.
        assert annotations["run.googleapis.com/cpu-throttling"] == "false"


# -- Cloud Armor (docs/operations.md) -------------------------------------------------------

BLOB_DIGEST = "sha256:" + "e" * 64
# Paths of every kind the server answers, and paths it answers only with its catch-all 404.
EDGE_PATHS = [
    "/", "/privacy", "/privacy/policy", "/v2", "/v2/", "/v2/_catalog", "/v2/tags/list",
    "/v2/pause/manifests/3.9", "/v2/pause/manifests/" + BLOB_DIGEST, f"/v2/pause/blobs/{BLOB_DIGEST}",
    f"/v2/pause/referrers/{BLOB_DIGEST}", "/v2/pause/tags/list", "/v2/pause/tags/list?n=10",
    "/v2/pause/manifests/sha256-" + "e" * 64 + ".sig", "/v2/kube-apiserver/tags/list",
    "/v1/_ping", "/favicon.ico", "/robots.txt", "/privacyx", "/v2x", "/.env", "/admin",
]


def cloud_armor_path_filter() -> re.Pattern[str]:
    """The path expression of the Cloud Armor rule in docs/operations.md (RE2; these features alike in Python)."""
    (expression,) = re.findall(r"--expression=\"!request\.path\.matches\('([^']+)'\)\"", OPERATIONS_DOC.read_text())
    return re.compile(expression)


@pytest.mark.parametrize("path", EDGE_PATHS)
def test_cloud_armor_path_filter_lets_through_every_path_the_server_serves(path: str) -> None:
    router = Router(load_settings(env={}))
    bare = path.split("?", 1)[0]  # Cloud Armor's request.path has no query
    served = router.classify("GET", bare) is not NOT_FOUND or bare.startswith("/v2/")
    assert bool(cloud_armor_path_filter().search(bare)) == served


# -- environment variables in both -----------------------------------------------------------


def _all_env() -> list[tuple[str, str, str]]:
    found = [(f"cloud run {region}", name, value)
             for region, service in cloud_run_services().items()
             for name, value in env_of(cloud_run_containers(service)["archeio"]).items()]
    patches = [*KUBERNETES.glob("overlays/**/*.yaml"), BASE_DEPLOYMENT]
    for path in patches:
        for doc in load_all(path):
            if doc.get("kind") == "Deployment":
                found += [(f"{path.relative_to(KUBERNETES)} {c['name']}", name, value)
                          for c in doc["spec"]["template"]["spec"]["containers"]
                          for name, value in env_of(c).items()]
    return found


@pytest.mark.parametrize(("where", "name", "value"), _all_env())
def test_every_env_name_is_a_setting_with_a_valid_value(where: str, name: str, value: str) -> None:
    assert name in SETTING_BY_ENV, f"{where}: {name} is not in archeio.config.SETTINGS"
    setting = SETTING_BY_ENV[name]
    if setting.field not in _PATH_SETTINGS:
        setting.parse(value)  # raises ValueError for a value the server would refuse


# -- Dockerfile -----------------------------------------------------------------------------


def dockerfile_stages() -> list[list[str]]:
    """Instructions per stage, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    stages: list[list[str]] = []
    for line in lines:
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def dockerfile_base_image() -> str:
    (default,) = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", DOCKERFILE.read_text(), re.M)
    return default


def test_dockerfile_is_multi_stage_and_runs_as_a_non_root_user() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    users = [line.split()[1] for line in stages[-1] if line.upper().startswith("USER ")]
    assert users, "the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0  # numeric: runAsNonRoot can check it


def test_dockerfile_final_stage_has_no_compilers_or_package_installs() -> None:
    final = " ".join(dockerfile_stages()[-1])
    assert not re.search(r"\b(gcc|g\+\+|clang|cc|make|build-essential|libc6-dev|apt-get|apk|pip)\b", final), final
    assert all(line.startswith("COPY --from=") for line in dockerfile_stages()[-1] if line.startswith("COPY"))


def test_dockerfile_installs_requirements_only_from_the_hashed_lock() -> None:
    installs = [part.strip() for stage in dockerfile_stages() for line in stage
                for part in line.split("&&") if re.search(r"pip install\b", part)]
    assert installs
    for install in installs:
        from_lock = "--require-hashes" in install and re.search(r"-r deploy/requirements[\w-]*\.txt", install)
        project_only = install.endswith(" .") and "--no-deps" in install
        assert (from_lock or project_only) and "--no-deps" in install, install


def test_dockerfile_healthcheck_uses_the_admin_port() -> None:
    final = dockerfile_stages()[-1]
    (check,) = [line for line in final if line.upper().startswith("HEALTHCHECK")]
    assert "http://127.0.0.1:%s/healthz" in check
    assert f"os.environ.get('ARCHEIO_ADMIN_PORT', '{SETTING_BY_ENV['ARCHEIO_ADMIN_PORT'].default}')" in check
    assert any(line.startswith("ENTRYPOINT") and "archeio" in line for line in final)


def test_dockerfile_copies_only_files_that_exist_and_are_not_ignored() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text()
    for stage in dockerfile_stages():
        for line in stage:
            if line.startswith("COPY ") and "--from=" not in line:
                for source in line.split()[1:-1]:
                    assert (REPO / source).exists(), source
                    assert f"!{source.rstrip('/')}" in ignore, f"{source} is excluded from the build context"


def test_operations_doc_names_the_dockerfiles_base_image_and_podmans_format_flag() -> None:
    doc = OPERATIONS_DOC.read_text()
    assert dockerfile_base_image() in doc
    assert "--format docker" in doc
