"""The Kubernetes load test (deploy/loadtest/), checked offline like deploy/kubernetes.

- Every resource passes `kubernetes-validate --strict`, and so does the
  archeio Deployment with server-patch.yaml merged in.
- What the schemas cannot know: the worker count agrees in its three
  places; the workers find the master's Service; Locust's variables are
  Locust's and the BENCH_* ones are the locustfile's knobs; the load test
  targets the archeio Service's name and port; the checks use the same
  settings as the server under test (upstream, mirrors file, default
  mirror, range data, missing share); the mirrors file covers every
  built-in AWS region on the stand-in bucket; pods are hardened; the
  image carries every module the locustfile imports.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from archeio.config import SETTINGS, builtin_mirrors, parse_mirrors

from .deploy_support import OLDEST_MINOR, kubectls, strict_validate

REPO = Path(__file__).resolve().parent.parent
LOADTEST = REPO / "deploy" / "loadtest"
BENCHMARKS = REPO / "benchmarks"
SETTING_NAMES = {s.env for s in SETTINGS}


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def resource_files() -> list[Path]:
    return [LOADTEST / name for name in yaml.safe_load((LOADTEST / "kustomization.yaml").read_text())["resources"]]


def resources() -> dict[tuple[str, str], dict[str, Any]]:
    return {(doc["kind"], doc["metadata"]["name"]): doc for path in resource_files() for doc in load_all(path)}


def kubernetes_validate(*files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", *map(str, files)],
        capture_output=True, text=True, timeout=120,
    )


def settings() -> dict[str, str]:
    return dict(resources()[("ConfigMap", "locust-settings")]["data"])


def pod(kind: str, name: str) -> dict[str, Any]:
    return dict(resources()[(kind, name)]["spec"]["template"]["spec"])


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def rendered(kubectl: str | None = None) -> list[dict[str, Any]]:
    """`kubectl kustomize deploy/loadtest`: archeio (google-lb, patched) and the load test."""
    kubectl = kubectl or kubectls()[OLDEST_MINOR]
    result = subprocess.run([kubectl, "kustomize", str(LOADTEST)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{kubectl} kustomize deploy/loadtest: {result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def rendered_one(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in rendered() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def patched_deployment() -> dict[str, Any]:
    """deploy/kubernetes's Deployment as the load test renders it, server-patch.yaml merged in."""
    return rendered_one("Deployment", "archeio")


def test_the_kustomization_lists_every_resource_file() -> None:
    on_disk = {p.name for p in LOADTEST.glob("*.yaml")} - {"kustomization.yaml", "server-patch.yaml"}
    assert {p.name for p in resource_files()} == on_disk
    kustomization = yaml.safe_load((LOADTEST / "kustomization.yaml").read_text())
    assert kustomization["bases"] == ["../kubernetes/overlays/google-lb/server"]
    assert kustomization["patchesStrategicMerge"] == ["server-patch.yaml"]


def test_the_load_test_renders_alike_with_every_kubectl() -> None:
    renderings = {minor: rendered(path) for minor, path in kubectls().items()}
    assert all(docs == renderings[OLDEST_MINOR] for docs in renderings.values())


def test_loadtest_manifests_pass_strict_schema_validation() -> None:
    assert {("Job", "locust-master"), ("Job", "locust-worker"), ("Service", "locust-master"),
            ("ConfigMap", "locust-settings"), ("Service", "standin-bucket")} <= set(resources())
    result = kubernetes_validate(*resource_files())
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_rendered_load_test_with_its_server_passes_strict_schema_validation(tmp_path: Path) -> None:
    assert strict_validate(rendered(), tmp_path) == []


def test_the_load_test_brings_no_load_balancer_resources() -> None:
    # It drives the Service directly, on any cluster: GKE's kinds would not apply there.
    assert {d["kind"] for d in rendered()} <= {"Deployment", "Service", "ConfigMap", "Job",
                                              "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    images = {c["image"] for d in rendered() if d["kind"] in ("Deployment", "Job")
              for c in d["spec"]["template"]["spec"]["containers"]}
    assert images == {"registry.example.com/archeio:latest", "registry.example.com/archeio-loadtest:latest"}


def test_worker_count_agrees_in_its_three_places() -> None:
    workers = resources()[("Job", "locust-worker")]["spec"]
    assert workers["parallelism"] == workers["completions"] == int(settings()["LOCUST_EXPECT_WORKERS"])


def test_workers_reach_the_master_service() -> None:
    service = resources()[("Service", "locust-master")]
    (master,) = pod("Job", "locust-master")["containers"]
    master_labels = resources()[("Job", "locust-master")]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= master_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in master["ports"]}
    assert settings()["LOCUST_MASTER_NODE_HOST"] == service["metadata"]["name"]
    assert int(settings()["LOCUST_MASTER_NODE_PORT"]) == port["port"]
    (worker,) = pod("Job", "locust-worker")["containers"]
    assert master["args"] == ["--master"] and worker["args"] == ["--worker"]


def test_every_locust_variable_is_a_locust_option() -> None:
    # In a subprocess: importing locust monkey-patches sockets and threads for good.
    listing = subprocess.run(
        [sys.executable, "-c", "from locust.argument_parser import get_parser\n"
         "print('\\n'.join(a.env_var for a in get_parser()._actions if getattr(a, 'env_var', None)))"],
        capture_output=True, text=True, timeout=120, check=True,
    )
    known = set(listing.stdout.split())
    assert "LOCUST_HOST" in known
    assert {name for name in settings() if name.startswith("LOCUST_")} <= known


def test_every_other_variable_is_a_locustfile_knob_or_a_server_setting() -> None:
    docstring = (BENCHMARKS / "locustfile.py").read_text().split('"""')[1]
    knobs = set(re.findall(r"^\| (BENCH_\w+) \|", docstring, re.M))
    for name in settings():
        if not name.startswith("LOCUST_"):
            assert name in knobs | SETTING_NAMES, name


def test_the_load_targets_the_archeio_service() -> None:
    service = rendered_one("Service", "archeio")
    (port,) = service["spec"]["ports"]
    assert settings()["LOCUST_HOST"] == f"http://{service['metadata']['name']}:{port['port']}"


def test_the_checks_use_the_server_under_tests_settings() -> None:
    server = env_of(next(c for c in patched_deployment()["spec"]["template"]["spec"]["containers"]
                         if c["name"] == "archeio"))
    mine = settings()
    for name in ("UPSTREAM_REGISTRY_ENDPOINT", "UPSTREAM_REGISTRY_PATH", "DEFAULT_AWS_BASE_URL",
                 "ARCHEIO_MIRRORS_FILE"):
        assert mine[name] == server[name], name
    # Both read the mirrors file from the same ConfigMap, and range data from the same image.
    assert mine["ARCHEIO_RANGES_DIR"] == "/app/ranges"
    bucket = resources()[("Deployment", "standin-bucket")]["spec"]["template"]["spec"]["containers"][0]
    assert bucket["command"][bucket["command"].index("--missing-share") + 1] == mine["BENCH_MISSING_SHARE"]


def test_the_mirrors_file_puts_every_builtin_region_on_the_stand_in_bucket() -> None:
    text = resources()[("ConfigMap", "archeio-loadtest-mirrors")]["data"]["mirrors.toml"]
    mirrors = parse_mirrors(text).by_cloud["AWS"]
    assert set(mirrors) == set(builtin_mirrors().by_cloud["AWS"])
    service = resources()[("Service", "standin-bucket")]
    assert all(url == f"http://{service['metadata']['name']}/aws-{region}" for region, url in mirrors.items())
    assert settings()["DEFAULT_AWS_BASE_URL"].startswith(f"http://{service['metadata']['name']}/")


def test_every_mount_of_the_mirrors_file_uses_the_configmap() -> None:
    path = Path(settings()["ARCHEIO_MIRRORS_FILE"])
    for kind, name in (("Job", "locust-master"), ("Job", "locust-worker")):
        spec = pod(kind, name)
        (container,) = spec["containers"]
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(path.parent))
        volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
        assert volume["configMap"]["name"] == "archeio-loadtest-mirrors"


def test_pods_are_hardened() -> None:
    for kind, name in (("Job", "locust-master"), ("Job", "locust-worker"), ("Deployment", "standin-bucket")):
        spec = pod(kind, name)
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
        assert spec["automountServiceAccountToken"] is False
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
            assert {"requests", "limits"} <= set(container["resources"])


def test_the_image_carries_every_module_the_locustfile_needs() -> None:
    dockerfile = (LOADTEST / "Dockerfile").read_text().replace("\\\n", " ")
    copied = {Path(source).name for line in dockerfile.splitlines() if line.startswith("COPY ")
              for source in line.split()[1:-1]}
    local = {p.stem for p in BENCHMARKS.glob("*.py")}
    needed, pending = {"locustfile", "standin_bucket"}, ["locustfile", "standin_bucket"]
    while pending:
        source = (BENCHMARKS / f"{pending.pop()}.py").read_text()
        for module in re.findall(r"^from (\w+) import", source, re.M):
            if module in local and module not in needed:
                needed.add(module)
                pending.append(module)
    assert {f"{m}.py" for m in needed} <= copied
    ignore = (LOADTEST / "Dockerfile.dockerignore").read_text()
    assert all(f"!benchmarks/{name}" in ignore for name in copied)
