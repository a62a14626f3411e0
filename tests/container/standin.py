"""A stand-in for the official `python:3.11-slim-bookworm` image, built from Debian packages.

No Docker registry can be reached from these machines, so deploy/Dockerfile's
base image cannot be pulled. This builds an image offering what the
Dockerfile (and any Dockerfile written for the official image) relies on,
and tags it with the official name, in the tests' own podman storage only:
the Dockerfile itself stays written for the real image.

The root filesystem comes from `mmdebstrap` (Debian bookworm, the `apt`
variant: the essential packages and apt, which the build stage uses to
install gcc), fetched from the Debian mirror that apt on this machine
already uses: it is read from /etc/apt/ here, never written into the
repository. It is packaged `FROM scratch` + `ADD`.

What the official image has and a Debian root filesystem lacks, added here:
- `python3-venv` (the build makes a virtualenv), `python3-dev` (Python.h:
  pytricia has no wheel and compiles), pip;
- `python`, `python3`, `pip`, `pip3`, `pydoc`, `python3-config`, ... in
  /usr/local/bin, which comes first in PATH; LANG=C.UTF-8;
- no EXTERNALLY-MANAGED marker;
- and, like it, no bytecode for the standard library (the official image
  deletes every .pyc), so the tests see whether the image compiles it.

Not imitated: Python is Debian's 3.11.2 in /usr, not the newest 3.11 built
under /usr/local.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from .podman import Podman

NAME = "docker.io/library/python:3.11-slim-bookworm"
SUITE = "bookworm"
# The official slim image's runtime packages (ca-certificates, netbase,
# tzdata), plus Debian's split-out parts of a full Python.
PACKAGES = ("python3", "python3-venv", "python3-dev", "python3-pip", "ca-certificates", "netbase", "tzdata")
APT_SOURCES = Path("/etc/apt")

# Run by mmdebstrap on the finished tree ($1), before it is packed.
_HOOKS = (
    # The official image's /usr/local/bin names, pointing at Debian's Python.
    'for name in python3 pip3 pydoc3 python3-config; do'
    ' ln -s "/usr/bin/$name" "$1/usr/local/bin/$name";'
    ' ln -s "$name" "$1/usr/local/bin/$(echo "$name" | tr -d 3)"; done',
    'rm -f "$1"/usr/lib/python3.*/EXTERNALLY-MANAGED',
    'find "$1/usr/lib" -name __pycache__ -prune -exec rm -rf {} +',
)
# Trimmed as Debian's slim images are: fewer files to unpack and pack.
_DPKG_OPTIONS = (
    "path-exclude=/usr/share/man/*", "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/doc/*", "path-include=/usr/share/doc/*/copyright",
)
CONTAINERFILE = """\
FROM scratch
ADD rootfs.tar /
ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin \\
    LANG=C.UTF-8
CMD ["python3"]
"""


class NoDebianMirror(RuntimeError):
    """apt on this machine names no Debian archive to build the base image from."""


def _stanzas(directory: Path) -> list[dict[str, list[str]]]:
    """The apt sources configured on this machine, as (type, uri, suite, ...) fields."""
    found: list[dict[str, list[str]]] = []
    for path in sorted(directory.glob("sources.list.d/*.sources")):
        for block in re.split(r"\n\s*\n", path.read_text()):
            fields: dict[str, list[str]] = {}
            for line in block.splitlines():
                if line.startswith("#") or ":" not in line or line[0].isspace():
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.split()
            if fields.get("enabled", ["yes"]) != ["no"]:
                found.append(fields)
    lists = [directory / "sources.list", *sorted(directory.glob("sources.list.d/*.list"))]
    for path in lists:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
            if len(words) >= 3:
                found.append({"types": [words[0]], "uris": [words[1]], "suites": [words[2]]})
    return found


def debian_sources(directory: Path = APT_SOURCES) -> str:
    """deb822 sources for bookworm, from the Debian archive and security URIs apt uses here.

    The host may run another Debian release: only its mirror's URIs are
    taken, the suites are bookworm's. Other repositories (a vendor's, a
    language's) are left out.
    """
    main: list[str] = []
    security: list[str] = []
    for stanza in _stanzas(directory):
        if "deb" not in stanza.get("types", []):
            continue
        suites = stanza.get("suites", [])
        if not any(re.fullmatch(r"[a-z]+(-updates|-security|-backports)?", s) for s in suites):
            continue
        target = security if any(s.endswith("-security") for s in suites) else main
        target.extend(uri for uri in stanza.get("uris", []) if uri.rstrip("/").endswith(("debian", "debian-security")))
    if not main:
        raise NoDebianMirror(f"no Debian archive in {directory}/sources.list.d/ or sources.list to build "
                             f"the {NAME} stand-in from")
    keyring = "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    text = (f"Types: deb\nURIs: {' '.join(dict.fromkeys(main))}\nSuites: {SUITE} {SUITE}-updates\n"
            f"Components: main\n{keyring}")
    if security:
        text += (f"\nTypes: deb\nURIs: {' '.join(dict.fromkeys(security))}\nSuites: {SUITE}-security\n"
                 f"Components: main\n{keyring}")
    return text


def build(podman: Podman, workdir: Path) -> None:
    """Build the stand-in and tag it `NAME` in `podman`'s storage."""
    sources = workdir / "debian.sources"
    sources.write_text(debian_sources())
    command = [
        "mmdebstrap", "--variant=apt", f"--include={','.join(PACKAGES)}",
        '--aptopt=Apt::Install-Recommends "false"',
        *(f"--dpkgopt={option}" for option in _DPKG_OPTIONS),
        *(f"--customize-hook={hook}" for hook in _HOOKS),
        SUITE, str(workdir / "rootfs.tar"), str(sources),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"mmdebstrap failed ({result.returncode}):\n{result.stderr[-4000:]}")
    (workdir / "Containerfile").write_text(CONTAINERFILE)
    try:
        podman("build", "--quiet", "--format", "docker", "--tag", NAME, str(workdir), timeout=600)
    finally:
        (workdir / "rootfs.tar").unlink(missing_ok=True)
