"""The Kubernetes manifests as users apply them: kustomize overlays rendered by kubectl.

Used by tests/test_deploy.py (schemas, arithmetic) and
tests/container/test_pod.py (the rendered pod run by `podman kube play`).

Kinds Kubernetes itself defines are checked by `kubernetes-validate
--strict`; the custom kinds (GKE's, the Gateway API's, Knative's as Cloud
Run reads it), which that tool passes with a mere warning, by
tests/crd_validate.cjs against their published schemas (`strict_validate`
sends each document to the one that knows its kind, and fails on a kind
neither knows).

The overlays must render with kubectl 1.20's built-in kustomize (v2.0.3),
the oldest in use, and alike with a current one. Debian's kubernetes-client
package has kubectl 1.20; scripts/test unpacks it into
.venv/kubernetes-client (on these machines Google's Cloud SDK package owns
/usr/bin/kubectl, so apt cannot install it beside). A kubectl on PATH
(Google's is 1.32, kustomize v5) renders too, for the comparison.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from .integration.services import MissingTool

REPO = Path(__file__).resolve().parents[1]
KUBERNETES = REPO / "deploy" / "kubernetes"
OVERLAYS = sorted(path.name for path in (KUBERNETES / "overlays").iterdir() if path.is_dir())
# Complete set-ups built on an overlay (deploy/kubernetes/examples/README.md).
EXAMPLES = sorted(path.name for path in (KUBERNETES / "examples").iterdir() if path.is_dir())
CRD_VALIDATOR = REPO / "tests" / "crd_validate.cjs"
NODE_MODULES = REPO / "node_modules"
DEBIAN_KUBECTL = REPO / ".venv" / "kubernetes-client" / "usr" / "bin" / "kubectl"
OLDEST_MINOR = 20


def kubectl_minor(kubectl: str) -> int:
    """The minor version of a kubectl (Google's dispatcher says "32+")."""
    out = subprocess.run([kubectl, "version", "--client", "-o", "json"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return int(json.loads(out)["clientVersion"]["minor"].rstrip("+"))


def kubectls() -> dict[int, str]:
    """Every kubectl found, by minor version: the unpacked Debian one and the one on PATH."""
    candidates = [str(DEBIAN_KUBECTL) if DEBIAN_KUBECTL.exists() else None, shutil.which("kubectl")]
    found: dict[int, str] = {}
    for path in dict.fromkeys(os.path.realpath(c) for c in candidates if c):
        found.setdefault(kubectl_minor(path), path)
    if OLDEST_MINOR not in found:
        raise MissingTool(
            f"no kubectl 1.{OLDEST_MINOR} (found {sorted(found)}): scripts/test unpacks Debian's "
            f"kubernetes-client into {DEBIAN_KUBECTL.parent.parent.parent} (apt-get download kubernetes-client)"
        )
    return found


def render(kubectl: str, overlay: str, kind: str = "overlays") -> list[dict[str, Any]]:
    """`kubectl kustomize` of one overlay (or, with kind="examples", one example), as documents."""
    result = subprocess.run([kubectl, "kustomize", str(KUBERNETES / kind / overlay)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{kubectl} kustomize {overlay}: {result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def kind_of(doc: dict[str, Any]) -> str:
    return f"{doc.get('apiVersion')} {doc.get('kind')}"


def _node() -> str:
    node = shutil.which("node")
    if node is None or not (NODE_MODULES / "typescript").is_dir():
        raise MissingTool(
            "the custom kinds' schemas need node and the npm packages of package.json in "
            f"{NODE_MODULES}: run scripts/test (it installs nodejs and npm with apt-get when root, "
            "then runs `npm ci`)"
        )
    return node


@functools.cache
def custom_kinds() -> frozenset[str]:
    """The "apiVersion kind" pairs tests/crd_validate.cjs validates."""
    listed = subprocess.run([_node(), str(CRD_VALIDATOR), "--kinds"], capture_output=True, text=True,
                            timeout=60, check=True)
    return frozenset(json.loads(listed.stdout))


def validate_custom(docs: list[dict[str, Any]]) -> list[str]:
    """Each failure of tests/crd_validate.cjs as "kind name: message" (empty: all valid)."""
    result = subprocess.run([_node(), str(CRD_VALIDATOR)], input=json.dumps(docs), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode in (0, 1), f"crd_validate.cjs exited {result.returncode}: {result.stderr}"
    return [f"{kind_of(docs[index])} {docs[index]['metadata']['name']}: {message}"
            for index, message in json.loads(result.stdout)["errors"]]


def validate_builtin(docs: list[dict[str, Any]], directory: Path) -> list[str]:
    """`kubernetes-validate --strict` of the documents; a kind it has no schema for is a failure too."""
    path = directory / "builtin.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    result = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", str(path)],
                            capture_output=True, text=True, timeout=120)
    # It passes a kind it does not know with a warning, and says so on every line of its output.
    failures = [line for line in (result.stdout + result.stderr).splitlines()
                if line.startswith(("ERROR", "CRITICAL")) or "Couldn't find schema" in line]
    if result.returncode != 0 and not failures:
        failures = [result.stdout + result.stderr]
    return failures


def strict_validate(docs: list[dict[str, Any]], directory: Path) -> list[str]:
    """Every document against its kind's published schema, unknown fields refused; the failures."""
    custom = [doc for doc in docs if kind_of(doc) in custom_kinds()]
    builtin = [doc for doc in docs if kind_of(doc) not in custom_kinds()]
    return (validate_custom(custom) if custom else []) + (validate_builtin(builtin, directory) if builtin else [])


def by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in docs}


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = by_kind(docs)["Deployment"]["spec"]["template"]["spec"]
    return spec


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in spec["containers"] if c["name"] == name)


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}
