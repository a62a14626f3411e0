"""The deploy files, checked offline: no Docker engine or cluster runs here.

- Kubernetes manifests: `kubernetes-validate --strict` against the bundled
  schemas (and a misspelled field must make it fail, so the check is real),
  plus what the schemas cannot know: probes on the admin port, the
  hardening, and a termination grace period that covers drain and grace.
- Cloud Run service YAML (unknown to that tool): required fields, the port,
  probes on a path our server answers 200, and shutdown within Cloud Run's
  10 s.
- Every environment variable in both is a row of archeio.config.SETTINGS,
  with a value that setting accepts.
- Dockerfile: multi-stage, non-root numeric USER, no compilers or package
  installs in the final stage, a healthcheck on the admin port.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from archeio.config import SETTINGS, load_settings
from archeio.routing import LocalAnswer, Router

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
K8S_FILES = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
CLOUD_RUN = DEPLOY / "cloudrun" / "service.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
SETTING_BY_ENV = {s.env: s for s in SETTINGS}
# Settings whose value names a path that exists only inside the container.
_PATH_SETTINGS = {"ranges_dir", "mirrors_file"}


def kubernetes_validate(*files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", *map(str, files)],
        capture_output=True, text=True, timeout=120,
    )


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def resources() -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for path in K8S_FILES for doc in load_all(path)}


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def serving_container(deployment: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "archeio")


# -- Kubernetes -----------------------------------------------------------------------


def test_kubernetes_manifests_pass_strict_schema_validation() -> None:
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= set(resources())
    result = kubernetes_validate(*K8S_FILES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_strict_validation_rejects_a_misspelled_field(tmp_path: Path) -> None:
    broken = tmp_path / "deployment.yaml"
    good = (DEPLOY / "kubernetes" / "deployment.yaml").read_text()
    broken.write_text(good.replace("readinessProbe", "readynessProbe"))
    assert kubernetes_validate(broken).returncode != 0


def test_probes_use_the_admin_port_and_its_endpoints() -> None:
    container = serving_container(resources()["Deployment"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["admin"] == int(env_of(container)["ARCHEIO_ADMIN_PORT"])
    assert ports["http"] == int(env_of(container)["PORT"])
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert all(probe["port"] == "admin" for probe in probes.values())
    assert probes["readinessProbe"]["path"] == "/readyz" and probes["livenessProbe"]["path"] == "/healthz"


def test_service_exposes_only_the_public_port() -> None:
    service = resources()["Service"]
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]


def test_pods_are_hardened_and_spread() -> None:
    pod = resources()["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    for container in pod["containers"] + pod.get("initContainers", []):
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True and context["runAsNonRoot"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert {"requests", "limits"} <= set(container["resources"])
    assert {c["topologyKey"] for c in pod["topologySpreadConstraints"]} == {
        "topology.kubernetes.io/zone", "kubernetes.io/hostname",
    }


def test_termination_grace_covers_drain_and_in_flight_requests() -> None:
    deployment = resources()["Deployment"]
    env = env_of(serving_container(deployment))
    needed = float(env["ARCHEIO_DRAIN_DELAY"]) + float(env["ARCHEIO_GRACE_PERIOD"])
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > needed


def test_autoscaler_and_disruption_budget_target_the_deployment() -> None:
    found = resources()
    labels = found["Deployment"]["spec"]["selector"]["matchLabels"]
    assert found["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == found["Deployment"]["metadata"]["name"]
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
    (container,) = template["spec"]["containers"]
    assert container["image"] and container["args"] == ["serve"]


def test_cloud_run_port_and_probes_reach_an_endpoint_that_answers_200(cloud_run: dict[str, Any]) -> None:
    (container,) = cloud_run["spec"]["template"]["spec"]["containers"]
    (port,) = container["ports"]
    assert port["containerPort"] == int(SETTING_BY_ENV["PORT"].default)
    # Cloud Run sets PORT itself and refuses it in env.
    assert "PORT" not in env_of(container)
    router = Router(load_settings(env={}))
    for kind in ("startupProbe", "livenessProbe"):
        probe = container[kind]["httpGet"]
        assert probe["port"] == port["containerPort"]
        answer = router.classify("GET", probe["path"])
        assert isinstance(answer, LocalAnswer) and answer.status == 200


def test_cloud_run_shutdown_fits_in_its_10_seconds(cloud_run: dict[str, Any]) -> None:
    (container,) = cloud_run["spec"]["template"]["spec"]["containers"]
    env = env_of(container)
    assert float(env["ARCHEIO_DRAIN_DELAY"]) + float(env["ARCHEIO_GRACE_PERIOD"]) < 10


# -- environment variables in both -----------------------------------------------------------


def _all_env() -> list[tuple[str, str, str]]:
    found = [("cloud run", name, value)
             for c in load_all(CLOUD_RUN)[0]["spec"]["template"]["spec"]["containers"]
             for name, value in env_of(c).items()]
    pod = resources()["Deployment"]["spec"]["template"]["spec"]
    found += [(c["name"], name, value) for c in pod["containers"] for name, value in env_of(c).items()]
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


def test_dockerfile_healthcheck_uses_the_admin_port() -> None:
    final = dockerfile_stages()[-1]
    (check,) = [line for line in final if line.upper().startswith("HEALTHCHECK")]
    assert f"127.0.0.1:{SETTING_BY_ENV['ARCHEIO_ADMIN_PORT'].default}/healthz" in check
    assert any(line.startswith("ENTRYPOINT") and "archeio" in line for line in final)


def test_dockerfile_copies_only_files_that_exist_and_are_not_ignored() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text()
    for stage in dockerfile_stages():
        for line in stage:
            if line.startswith("COPY ") and "--from=" not in line:
                for source in line.split()[1:-1]:
                    assert (REPO / source).exists(), source
                    assert f"!{source.rstrip('/')}" in ignore, f"{source} is excluded from the build context"
