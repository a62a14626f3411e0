"""podman for the container tests: a storage and configuration of their own, and its preflight.

Every podman command here runs with two files written by `PodmanHome`,
each line needed on machines like the team's (Debian bookworm as root in a
sandbox, no Docker engine):

- CONTAINERS_CONF: the runc runtime (crun refuses "cgroups in hybrid mode"
  here), and open-file and process ulimits no higher than this process's
  own hard limits (podman's default of 1048576 open files is above the
  sandbox's, and raising it needs CAP_SYS_RESOURCE);
- CONTAINERS_STORAGE_CONF: images, layers and containers under a directory
  of this test session, so the tests never read or replace the machine's
  own podman images (a real python:3.11-slim-bookworm pulled there stays
  untouched) and start cold, as CI does. The session removes it at the end.

Containers use the host's network and free loopback ports: no bridge, no
iptables, and nothing but 127.0.0.1 is ever contacted.

`preflight` names the exact step missing when podman cannot run. Nothing
here knows about pytest.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..integration.services import MissingTool, ServiceFailed, wait_until
from ..ops_support import http_get

# The program each step needs, and the Debian package that has it.
PACKAGE_OF = {"podman": "podman", "runc": "runc", "catatonit": "catatonit", "mmdebstrap": "mmdebstrap"}
# Where Debian's catatonit package puts the init that `podman kube play` needs.
CATATONIT = ("/usr/libexec/podman/catatonit", "/usr/bin/catatonit")
# podman's own log lines (logrus) on stderr, e.g. the harmless "unable to get
# systemd connection to add healthchecks" on a machine without systemd.
_PODMAN_LOG_PREFIX = 'time="'


class PodmanUnusable(RuntimeError):
    """podman cannot run here; the message names the missing step."""


def _ulimit(kind: int, ceiling: int) -> int:
    hard = resource.getrlimit(kind)[1]
    return ceiling if hard == resource.RLIM_INFINITY else min(hard, ceiling)


def require_programs() -> None:
    """MissingTool naming the apt packages of any program the container tests lack."""
    found = {name: shutil.which(name) for name in ("podman", "runc", "mmdebstrap")}
    found["catatonit"] = next((path for path in CATATONIT if Path(path).exists()), None)
    missing = sorted(name for name, path in found.items() if not path)
    if missing:
        packages = " ".join(PACKAGE_OF[name] for name in missing)
        raise MissingTool(
            f"missing {', '.join(missing)}: install with `apt-get install {packages}` "
            "(scripts/test does this when run as root)"
        )


def podman_messages(text: str) -> str:
    """`text` without podman's own log lines: what a command or container said."""
    return "\n".join(line for line in text.splitlines() if not line.startswith(_PODMAN_LOG_PREFIX))


@dataclass(frozen=True)
class PodmanHome:
    """The directory holding this session's podman configuration and storage."""

    root: Path

    @property
    def env(self) -> dict[str, str]:
        return {
            "CONTAINERS_CONF": str(self.root / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(self.root / "storage.conf"),
        }

    def write_config(self) -> None:
        nofile = _ulimit(resource.RLIMIT_NOFILE, 1048576)
        nproc = _ulimit(resource.RLIMIT_NPROC, 32768)
        (self.root / "containers.conf").write_text(
            "[containers]\n"
            f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
            "[engine]\n"
            'runtime = "runc"\n'
            # No journald here; podman's state of this storage stays beside it.
            'events_logger = "file"\n'
            f'tmp_dir = "{self.root / "libpod"}"\n'
        )
        (self.root / "storage.conf").write_text(
            "[storage]\n"
            'driver = "overlay"\n'
            f'graphroot = "{self.root / "storage"}"\n'
            f'runroot = "{self.root / "run"}"\n'
        )


@dataclass(frozen=True)
class Podman:
    """Runs podman commands against one `PodmanHome`."""

    home: PodmanHome

    def __call__(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["podman", *args], env={**os.environ, **self.home.env},
            capture_output=True, text=True, timeout=timeout,
        )
        if check and result.returncode != 0:
            raise ServiceFailed(
                f"podman {' '.join(args[:3])} ... exited {result.returncode}:\n"
                + podman_messages(result.stderr)[-4000:]
            )
        return result

    def preflight(self) -> None:
        """PodmanUnusable naming the missing step, unless podman can run containers here."""
        if os.geteuid() != 0:
            raise PodmanUnusable(
                "the container tests need root (rootful podman, and mmdebstrap's root mode for "
                "the base image): run scripts/test as root, as CI does"
            )
        require_programs()
        info = self("info", "--format", "{{.Host.OCIRuntime.Name}}", check=False, timeout=60)
        if info.returncode != 0:
            raise PodmanUnusable(
                f"`podman info` fails with CONTAINERS_CONF={self.home.env['CONTAINERS_CONF']}: "
                + podman_messages(info.stderr).strip()[-2000:]
            )
        if info.stdout.strip() != "runc":
            raise PodmanUnusable(f"podman uses {info.stdout.strip()!r}, not runc: CONTAINERS_CONF was not read")

    def remove_everything(self) -> None:
        """Remove this storage's pods, containers and images (before deleting its directory)."""
        self("pod", "rm", "--all", "--force", check=False)
        self("rm", "--all", "--force", "--time", "0", check=False)
        self("rmi", "--all", "--force", check=False, timeout=300)

    def exit_code(self, name: str) -> int:
        return int(self("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip())

    def logs(self, name: str) -> str:
        """What the container wrote to stdout and stderr."""
        result = self("logs", name, check=False)
        return result.stdout + result.stderr


@dataclass(frozen=True)
class Container:
    """A container started by `running_container`, with the ports it serves on."""

    podman: Podman
    name: str
    port: int
    admin_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def running(self) -> bool:
        state = self.podman("inspect", "--format", "{{.State.Running}}", self.name, check=False)
        return state.stdout.strip() == "true"

    def exec(self, *command: str) -> subprocess.CompletedProcess[str]:
        return self.podman("exec", self.name, *command, check=False, timeout=60)

    def wait_ready(self, timeout: float = 60) -> None:
        """Poll /readyz on the admin port; ServiceFailed with the log if the container stops first."""

        def alive() -> None:
            if not self.running():
                raise ServiceFailed(f"container {self.name} stopped:\n{self.podman.logs(self.name)[-4000:]}")

        wait_until(lambda: http_get(self.admin_url + "/readyz", timeout=2)[0] == 200,
                   what=f"{self.name} to be ready", timeout=timeout, alive=alive)


def server_env(port: int, admin_port: int, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Settings for a server on the host's network: loopback only, on the given free ports."""
    return {"PORT": str(port), "ARCHEIO_HOST": "127.0.0.1",
            "ARCHEIO_ADMIN_PORT": str(admin_port), "ARCHEIO_ADMIN_HOST": "127.0.0.1", **(extra or {})}


def env_flags(env: Mapping[str, str]) -> list[str]:
    return [flag for name, value in env.items() for flag in ("--env", f"{name}={value}")]


@contextlib.contextmanager
def running_container(
    podman: Podman, image: str, name: str, *, port: int, admin_port: int,
    flags: Sequence[str] = (), env: Mapping[str, str] | None = None, args: Sequence[str] = (),
) -> Iterator[Container]:
    """`podman run --detach` on the host's network; removed on the way out, also on failure."""
    podman("run", "--detach", "--name", name, "--network", "host", *flags,
           *env_flags(server_env(port, admin_port, env)), image, *args)
    try:
        yield Container(podman, name, port, admin_port)
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)
