"""The deploy files, checked without a cluster (tests/container/ builds and runs them).

- Kubernetes: every kustomize overlay rendered by kubectl 1.20's built-in
  kustomize, alike with a current kubectl, passes `kubernetes-validate
  --strict` (and a misspelled field must fail it, so the check is real);
  plus what the schemas cannot know: each overlay's X-Forwarded-For trust,
  the image named once, no `replicas:` beside the autoscaler, the memory
  arithmetic, tolerant probes, a sidecar that ends on SIGTERM, probes on
  the admin port, the hardening, a grace period covering drain and grace.
- Cloud Run service YAML (unknown to that tool): required fields, the port,
  probes on a path our server answers 200, shutdown within Cloud Run's
  10 s, no region written in.
- Every environment variable in both is a row of archeio.config.SETTINGS,
  with a value that setting accepts.
- Dockerfile: multi-stage, non-root numeric USER, no compilers or package
  installs in the final stage, hash-checked installs, a healthcheck on the
  admin port; the docs name its base image.
"""

from __future__ import annotations

import contextlib
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
from archeio.routing import LocalAnswer, Router

from .deploy_support import (
    KUBERNETES,
    OLDEST_MINOR,
    OVERLAYS,
    REPO,
    by_kind,
    container,
    env_of,
    kubectls,
    pod_spec,
    render,
)
from .integration.services import MissingTool, wait_until

DEPLOY = REPO / "deploy"
BASE = KUBERNETES / "base"
BASE_DEPLOYMENT = BASE / "deployment.yaml"
CLOUD_RUN = DEPLOY / "cloudrun" / "service.yaml"
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


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_overlay_passes_strict_schema_validation(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, tmp_path: Path,
) -> None:
    docs = rendered[overlay]
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= set(by_kind(docs))
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    result = kubernetes_validate(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_strict_validation_rejects_a_misspelled_field(tmp_path: Path) -> None:
    broken = tmp_path / "deployment.yaml"
    broken.write_text(BASE_DEPLOYMENT.read_text().replace("readinessProbe", "readynessProbe"))
    assert kubernetes_validate(broken).returncode != 0


# -- Kubernetes: the front, the image, the replica count -------------------------------


def test_every_overlay_is_a_known_front() -> None:
    assert set(OVERLAYS) == set(TRUSTED_HOPS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_trusts_the_hops_its_front_appends(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    assert env_of(server_of(rendered, overlay))["ARCHEIO_TRUSTED_HOPS"] == TRUSTED_HOPS[overlay]


def test_base_leaves_trusted_hops_to_the_overlays() -> None:
    (deployment,) = [doc for doc in load_all(BASE_DEPLOYMENT) if doc["kind"] == "Deployment"]
    assert "ARCHEIO_TRUSTED_HOPS" not in env_of(container(deployment["spec"]["template"]["spec"], "archeio"))


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


@pytest.fixture(scope="module")
def cloud_run() -> dict[str, Any]:
    (doc,) = load_all(CLOUD_RUN)
    return doc


def test_cloud_run_service_has_the_required_shape(cloud_run: dict[str, Any]) -> None:
    assert cloud_run["apiVersion"] == "serving.knative.dev/v1" and cloud_run["kind"] == "Service"
    assert cloud_run["metadata"]["name"]
    template = cloud_run["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    low = int(annotations["autoscaling.knative.dev/minScale"])
    high = int(annotations["autoscaling.knative.dev/maxScale"])
    assert 1 <= low <= high
    assert template["spec"]["containerConcurrency"] == 1000
    (each,) = template["spec"]["containers"]
    assert each["image"] and each["args"] == ["serve"]


def test_cloud_run_service_leaves_the_region_to_the_deploy_command(cloud_run: dict[str, Any]) -> None:
    # One file for every region, each named by `gcloud run services replace --region R`.
    assert "cloud.googleapis.com/location" not in cloud_run["metadata"].get("labels", {})


def test_cloud_run_port_and_probes_reach_an_endpoint_that_answers_200(cloud_run: dict[str, Any]) -> None:
    (each,) = cloud_run["spec"]["template"]["spec"]["containers"]
    (port,) = each["ports"]
    assert port["containerPort"] == int(SETTING_BY_ENV["PORT"].default)
    # Cloud Run sets PORT itself and refuses it in env.
    assert "PORT" not in env_of(each)
    router = Router(load_settings(env={}))
    for kind in ("startupProbe", "livenessProbe"):
        probe = each[kind]["httpGet"]
        assert probe["port"] == port["containerPort"]
        answer = router.classify("GET", probe["path"])
        assert isinstance(answer, LocalAnswer) and answer.status == 200


def test_cloud_run_shutdown_fits_in_its_10_seconds(cloud_run: dict[str, Any]) -> None:
    (each,) = cloud_run["spec"]["template"]["spec"]["containers"]
    env = env_of(each)
    assert float(env["ARCHEIO_DRAIN_DELAY"]) + float(env["ARCHEIO_GRACE_PERIOD"]) < 10


# -- environment variables in both -----------------------------------------------------------


def _all_env() -> list[tuple[str, str, str]]:
    found = [("cloud run", name, value)
             for c in load_all(CLOUD_RUN)[0]["spec"]["template"]["spec"]["containers"]
             for name, value in env_of(c).items()]
    patches = [*KUBERNETES.glob("overlays/*/*.yaml"), BASE_DEPLOYMENT]
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
