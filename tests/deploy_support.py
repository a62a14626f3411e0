"""The Kubernetes manifests as users apply them: kustomize overlays rendered by kubectl.

Used by tests/test_deploy.py (schemas, arithmetic) and
tests/container/test_pod.py (the rendered pod run by `podman kube play`).

The overlays must render with kubectl 1.20's built-in kustomize (v2.0.3),
the oldest in use, and alike with a current one. Debian's kubernetes-client
package has kubectl 1.20; scripts/test unpacks it into
.venv/kubernetes-client (on these machines Google's Cloud SDK package owns
/usr/bin/kubectl, so apt cannot install it beside). A kubectl on PATH
(Google's is 1.32, kustomize v5) renders too, for the comparison.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from .integration.services import MissingTool

REPO = Path(__file__).resolve().parents[1]
KUBERNETES = REPO / "deploy" / "kubernetes"
OVERLAYS = sorted(path.name for path in (KUBERNETES / "overlays").iterdir() if path.is_dir())
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


def render(kubectl: str, overlay: str) -> list[dict[str, Any]]:
    """`kubectl kustomize` of one overlay, as documents."""
    result = subprocess.run([kubectl, "kustomize", str(KUBERNETES / "overlays" / overlay)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{kubectl} kustomize {overlay}: {result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in docs}


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = by_kind(docs)["Deployment"]["spec"]["template"]["spec"]
    return spec


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in spec["containers"] if c["name"] == name)


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}
