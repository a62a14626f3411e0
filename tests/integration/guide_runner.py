"""Running a guide's command blocks against the suite's servers, as a user would run them.

Only the host names change (`localize`); the servers speak plain HTTP, which
skopeo learns from a registries.conf marking them insecure. The guide's
`skopeo` is a shim that adds `--registries-conf`: skopeo 1.9 ignores
CONTAINERS_REGISTRIES_CONF, and the system's file is not ours to change.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from pathlib import Path

from . import services


def localize(text: str, hosts: Mapping[str, str]) -> str:
    """The guide's host names replaced by the test's; plain HTTP where a URL names a scheme."""
    for name, replacement in hosts.items():
        text = text.replace(f"https://{name}", f"http://{replacement}")
    for name, replacement in hosts.items():
        text = text.replace(name, replacement)
    return text


def insecure_registries_conf(path: Path, *hosts: str) -> Path:
    path.write_text("".join(f'[[registry]]\nlocation = "{host}"\ninsecure = true\n\n' for host in hosts))
    return path


def shell_env(workdir: Path, *insecure_hosts: str) -> dict[str, str]:
    """The environment the guide's commands run in: a skopeo that trusts `insecure_hosts` over HTTP."""
    conf = insecure_registries_conf(workdir / "registries.conf", *insecure_hosts)
    shims = workdir / "bin"
    shims.mkdir(exist_ok=True)
    skopeo = services.require_tools("skopeo")["skopeo"]
    (shims / "skopeo").write_text(f'#!/bin/sh\nexec {skopeo} --registries-conf {conf} "$@"\n')
    (shims / "skopeo").chmod(0o755)
    return {**os.environ, "PATH": f"{shims}{os.pathsep}{os.environ.get('PATH', '')}"}


def run_shell(body: str, workdir: Path, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """A shell block run by bash with errors fatal, as `set -euo pipefail` would."""
    return subprocess.run(["bash", "-euo", "pipefail", "-c", body], cwd=workdir, env=dict(env),
                          capture_output=True, text=True, timeout=300, check=False)
