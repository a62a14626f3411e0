"""Real servers for end-to-end tests: a registry, an S3 store, a proxy, archeio itself.

Each server is a context manager that starts one real process on a free
loopback port, polls it until it answers, yields a small handle and stops
the process by its PID (its whole process group) on the way out, also when
the test body raised.

Where a blob "actually came from" is read from the servers' own request
logs, never from archeio: `docker-registry` writes an access log line per
request, moto's S3 server (werkzeug) writes one per request. Both write the
line before the client has the complete response (the registry logs when
its handler returns, before net/http flushes the last buffered bytes;
werkzeug logs when it sends the status line), so once a client has finished
a pull, every request of that pull is in the logs. `RequestLog` parses them.

Nothing here knows about pytest; a missing program raises `MissingTool`
whose message says what to install.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

LOOPBACK = "127.0.0.1"
START_TIMEOUT = 30.0

# Debian package that provides each program the suite runs.
PACKAGE_OF = {
    "docker-registry": "docker-registry",
    "skopeo": "skopeo",
    "nginx": "nginx-light",
    "containerd": "containerd",
    "ctr": "containerd",
}

T = TypeVar("T")


class MissingTool(RuntimeError):
    """A program the integration suite needs is not installed."""


class ServiceFailed(RuntimeError):
    """A server did not start, or died; the message carries its log's tail."""


def require_tools(*programs: str) -> dict[str, str]:
    """Paths of `programs`; MissingTool naming the apt packages if any is absent."""
    found = {p: shutil.which(p) or "" for p in programs}
    missing = [p for p, path in found.items() if not path]
    if missing:
        packages = sorted({PACKAGE_OF.get(p, p) for p in missing})
        raise MissingTool(
            f"missing {', '.join(missing)}: install with `apt-get install {' '.join(packages)}` "
            "(scripts/test does this when run as root)"
        )
    return found


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def wait_until(
    check: Callable[[], T | None], *, what: str, timeout: float = START_TIMEOUT,
    alive: Callable[[], None] | None = None,
) -> T:
    """Poll `check` until it returns something truthy; ServiceFailed after `timeout`.

    `alive` is called between polls and should raise if the process being
    waited for has died, so a crash is reported at once with its log.
    """
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        result = check()
        if result:
            return result
        if alive is not None:
            alive()
        if time.monotonic() > deadline:
            raise ServiceFailed(f"timed out after {timeout:.0f}s waiting for {what}")
        # A short, growing poll interval: fast start-ups are seen at once.
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def http_status(url: str, method: str = "GET", headers: Mapping[str, str] | None = None) -> int | None:
    """The status of one request (redirects not followed); None if nothing answers."""
    request = urllib.request.Request(url, method=method, headers=dict(headers or {}))
    try:
        with _NO_REDIRECTS.open(request, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, urllib.error.URLError):
        return None


class _KeepRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


_NO_REDIRECTS = urllib.request.build_opener(_KeepRedirects)


@dataclass
class Process:
    """A started server process with its combined output in `log_path`."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        """ServiceFailed with the log's tail if the process has exited."""
        code = self.popen.poll()
        if code is not None:
            raise ServiceFailed(f"{self.name} exited with status {code}:\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to the process group by PID, SIGKILL if it does not go."""
        if self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self.popen.wait(timeout)


@contextlib.contextmanager
def running(
    name: str, argv: list[str], log_path: Path, *, env: Mapping[str, str] | None = None,
    cwd: Path | None = None, stdout_path: Path | None = None,
) -> Iterator[Process]:
    """Start `argv` in its own process group; stop it by PID on exit.

    stderr goes to `log_path`, stdout too unless `stdout_path` is given.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as files:
        err = files.enter_context(open(log_path, "ab"))
        out = files.enter_context(open(stdout_path, "ab")) if stdout_path else err
        popen = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=cwd,
            env=dict(env) if env is not None else None, start_new_session=True,
        )
    process = Process(name, popen, log_path)
    try:
        yield process
    finally:
        process.stop()


def wait_for_http(process: Process, url: str, expect: int = 200, timeout: float = START_TIMEOUT) -> None:
    """Poll `url` until it answers `expect`, failing early if `process` died."""
    wait_until(
        lambda: http_status(url) == expect, what=f"{process.name} at {url}",
        timeout=timeout, alive=process.check_alive,
    )


# -- request logs ------------------------------------------------------------

# Both the registry's combined access log and werkzeug's log quote the
# request line: `"GET /path HTTP/1.1" 200`. werkzeug colours some of them.
_REQUEST_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<target>\S+) HTTP/[0-9.]+" (?P<status>\d{3})')
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class LoggedRequest:
    method: str
    path: str
    query: str
    status: int


class RequestLog:
    """The requests a server logged, read back from its log file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def requests(self) -> list[LoggedRequest]:
        try:
            text = self.path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        found = []
        for line in text.splitlines():
            match = _REQUEST_LINE.search(_ANSI.sub("", line))
            if match:
                path, _, query = match["target"].partition("?")
                found.append(LoggedRequest(match["method"], path, query, int(match["status"])))
        return found

    def count(self, path_suffix: str, method: str | None = None, status: int | None = None) -> int:
        """Requests whose path ends with `path_suffix` (and match method/status if given)."""
        return sum(
            1 for r in self.requests()
            if r.path.endswith(path_suffix)
            and (method is None or r.method == method)
            and (status is None or r.status == status)
        )

    def mark(self) -> int:
        """How many requests are logged now; pass to `since` to see only later ones."""
        return len(self.requests())

    def since(self, mark: int) -> list[LoggedRequest]:
        return self.requests()[mark:]


# -- the registry --------------------------------------------------------------


@dataclass
class Registry:
    """A running `docker-registry` (distribution v2) with filesystem storage."""

    url: str
    host: str  # host:port, as skopeo's docker:// references want it
    storage: Path
    log: RequestLog
    process: Process


@contextlib.contextmanager
def docker_registry(workdir: Path, name: str = "registry") -> Iterator[Registry]:
    """Debian's docker-registry on a free loopback port, storage under `workdir`."""
    program = require_tools("docker-registry")["docker-registry"]
    base = workdir / name
    storage = base / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    port = free_port()
    # JSON is valid YAML; the access log (stdout) has one line per request.
    config = {
        "version": 0.1,
        "log": {"level": "warn", "formatter": "text", "accesslog": {"disabled": False}},
        "storage": {"filesystem": {"rootdirectory": str(storage)}, "delete": {"enabled": True}},
        "http": {"addr": f"{LOOPBACK}:{port}", "secret": "integration-tests"},
    }
    config_path = base / "config.yml"
    config_path.write_text(json.dumps(config))
    access_log = base / "access.log"
    with running(
        name, [program, "serve", str(config_path)], base / "registry.log", stdout_path=access_log,
    ) as process:
        url = f"http://{LOOPBACK}:{port}"
        wait_for_http(process, url + "/v2/")
        yield Registry(url, f"{LOOPBACK}:{port}", storage, RequestLog(access_log), process)


# -- the S3 store ----------------------------------------------------------------


@dataclass
class S3Server:
    """A running moto S3 server; buckets are addressed path-style: `<url>/<bucket>`."""

    url: str
    log: RequestLog
    process: Process
    region: str = "us-east-1"
    _client: object = field(default=None, repr=False)

    def client(self):  # type: ignore[no-untyped-def]  # boto3 clients are untyped
        """A boto3 S3 client for set-up (creating buckets, uploading blobs)."""
        if self._client is None:
            import boto3

            self._client = boto3.client(
                "s3", endpoint_url=self.url, region_name=self.region,
                aws_access_key_id="integration", aws_secret_access_key="integration",
            )
        return self._client

    def bucket_url(self, bucket: str) -> str:
        return f"{self.url}/{bucket}"

    def create_bucket(self, bucket: str) -> str:
        """Create `bucket`; its base URL, as a mirrors file wants it."""
        self.client().create_bucket(Bucket=bucket)
        return self.bucket_url(bucket)

    def put_public(self, bucket: str, key: str, data: bytes) -> None:
        """Upload an object anyone may read (moto answers anonymous HEAD/GET for it)."""
        self.client().put_object(Bucket=bucket, Key=key, Body=data, ACL="public-read")

    def delete(self, bucket: str, key: str) -> None:
        self.client().delete_object(Bucket=bucket, Key=key)


def blob_key(digest: str) -> str:
    """Where a mirror holds a blob, as archeio looks it up."""
    return f"containers/images/{digest}"


@contextlib.contextmanager
def s3_server(workdir: Path, name: str = "s3") -> Iterator[S3Server]:
    """moto's S3 server (`python -m moto.server`) on a free loopback port."""
    base = workdir / name
    base.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = base / "moto.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}
    argv = [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(port)]
    with running(name, argv, log_path, env=env) as process:
        url = f"http://{LOOPBACK}:{port}"
        wait_for_http(process, url + "/moto-api/")
        yield S3Server(url, RequestLog(log_path), process)


# -- the proxy that plays the load balancer ----------------------------------------------


@dataclass
class Proxy:
    """nginx with one listener per simulated client: `urls[client]`."""

    urls: dict[str, str]
    addresses: dict[str, str]
    process: Process

    def host(self, client: str) -> str:
        """host:port of `client`'s listener, for docker:// references."""
        return self.urls[client].removeprefix("http://")


_NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {base}/nginx.pid;
error_log {base}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {base}/access.log;
{temp_paths}
{servers}
}}
"""


def nginx_temp_paths(base: Path) -> str:
    """nginx's temporary directories, under `base` (its default ones are the system's)."""
    kinds = {"client_body": "body", "proxy": "proxy", "fastcgi": "fastcgi", "uwsgi": "uwsgi", "scgi": "scgi"}
    return "\n".join(f"    {kind}_temp_path {base}/{name};" for kind, name in kinds.items())

_NGINX_SERVER = """\
    server {{
        listen {listen};
        location / {{
            proxy_pass {target};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            # What Google's load balancer appends: the client it saw, then itself.
            proxy_set_header X-Forwarded-For "{address}, 127.0.0.1";
            proxy_redirect off;
        }}
    }}
"""


@contextlib.contextmanager
def nginx_proxy(
    workdir: Path, target_url: str, clients: Mapping[str, str], name: str = "nginx",
) -> Iterator[Proxy]:
    """nginx forwarding to `target_url`, one loopback listener per client name.

    `clients` maps a name to the address that listener reports as the
    client (only ever a header value; no traffic goes there).
    """
    ports = {client: free_port() for client in clients}
    servers = "".join(
        _NGINX_SERVER.format(listen=f"{LOOPBACK}:{ports[c]}", target=target_url, address=address)
        for c, address in clients.items()
    )
    urls = {c: f"http://{LOOPBACK}:{p}" for c, p in ports.items()}
    with _nginx(workdir, name, servers, list(urls.values())) as process:
        yield Proxy(urls, dict(clients), process)


@contextlib.contextmanager
def _nginx(workdir: Path, name: str, servers: str, urls: list[str]) -> Iterator[Process]:
    """nginx serving `servers` (server blocks), once each of `urls` answers `/v2/` with 200."""
    program = require_tools("nginx")["nginx"]
    base = workdir / name
    base.mkdir(parents=True, exist_ok=True)
    config_path = base / "nginx.conf"
    config_path.write_text(_NGINX_CONF.format(base=base, temp_paths=nginx_temp_paths(base), servers=servers))
    argv = [program, "-p", str(base), "-e", str(base / "error.log"), "-c", str(config_path)]
    with running(name, argv, base / "nginx.out") as process:
        for url in urls:
            wait_until(
                lambda u=url: http_status(u + "/v2/") == 200, what=f"nginx at {url}",
                alive=lambda: _alive_with_log(process, base / "error.log"),
            )
        yield process


# Refusals as the hosts behind archeio answer them: a repository path with
# /forbidden/ gets 403 (Google's front end, S3), one with /limited/ 429 (a
# rate limit), every blob 403; everything else is the registry's answer.
_NGINX_REFUSING = """\
    server {{
        listen {listen};
        location ~ /forbidden/ {{ return 403; }}
        location ~ /limited/ {{ return 429; }}
        location ~ /blobs/ {{ return 403; }}
        location / {{
            proxy_pass {target};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_redirect off;
        }}
    }}
"""


@dataclass
class RefusingFront:
    """nginx before a registry, refusing some requests (see _NGINX_REFUSING)."""

    url: str
    process: Process


@contextlib.contextmanager
def refusing_front(workdir: Path, registry: Registry, name: str = "nginx-refusing") -> Iterator[RefusingFront]:
    """A real HTTP server answering 403 and 429 where real registries and buckets may."""
    listen = f"{LOOPBACK}:{free_port()}"
    url = f"http://{listen}"
    with _nginx(workdir, name, _NGINX_REFUSING.format(listen=listen, target=registry.url), [url]) as process:
        yield RefusingFront(url, process)


def _alive_with_log(process: Process, log: Path) -> None:
    if process.popen.poll() is not None:
        raise ServiceFailed(f"{process.name} exited:\n{log.read_text(errors='replace')[-3000:]}")


# -- archeio ---------------------------------------------------------------------------


@dataclass
class Archeio:
    """A running `archeio serve` process."""

    url: str
    host: str
    admin_url: str  # /metrics, /healthz, /readyz
    env: dict[str, str]
    process: Process


@contextlib.contextmanager
def archeio_server(workdir: Path, settings: Mapping[str, str], name: str = "archeio") -> Iterator[Archeio]:
    """`archeio serve` with `settings` as environment variables.

    PORT, ARCHEIO_HOST and the admin port are chosen here (free loopback ports);
    the range data is the embedded default unless `settings` names a directory.
    """
    base = workdir / name
    base.mkdir(parents=True, exist_ok=True)
    port = free_port()
    admin_port = free_port()
    env = {
        "ARCHEIO_HOST": LOOPBACK, "PORT": str(port),
        "ARCHEIO_ADMIN_HOST": LOOPBACK, "ARCHEIO_ADMIN_PORT": str(admin_port),
        "ARCHEIO_ACCESS_LOG": "1",
    }
    env.update(settings)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("ARCHEIO_")}
    full_env.update(env)
    # The installed console script, as users run it; `-m archeio` where it is not installed.
    script = Path(sys.executable).with_name("archeio")
    argv = [str(script), "serve"] if script.exists() else [sys.executable, "-m", "archeio", "serve"]
    with running(name, argv, base / "archeio.log", env=full_env, cwd=base) as process:
        url = f"http://{LOOPBACK}:{port}"
        wait_for_http(process, url + "/v2/")
        yield Archeio(url, f"{LOOPBACK}:{port}", f"http://{LOOPBACK}:{admin_port}", env, process)


def write_mirrors_file(path: Path, mirrors: Mapping[str, Mapping[str, str]]) -> Path:
    """An ARCHEIO_MIRRORS_FILE: `{"AWS": {"eu-west-3": url}}` -> `[mirrors.AWS]` TOML."""
    lines = []
    for cloud, regions in mirrors.items():
        lines.append(f"[mirrors.{cloud}]")
        lines.extend(f'"{region}" = "{url}"' for region, url in regions.items())
        lines.append("")
    path.write_text("\n".join(lines))
    return path


# -- containerd ----------------------------------------------------------------------------


@dataclass
class Containerd:
    """A private containerd daemon (content, images, native snapshotter; no runtime)."""

    address: str  # its gRPC socket, for `ctr --address`
    root: Path
    process: Process

    def ctr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run `ctr` against this daemon in the `integration` namespace."""
        argv = [require_tools("ctr")["ctr"], "--address", self.address, "--namespace", "integration", *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


# Plugins that need a container runtime, cgroups or kernel features we do not
# use: pulling and unpacking needs only content, metadata and snapshotters.
_CONTAINERD_DISABLED = [
    "io.containerd.grpc.v1.cri",
    "io.containerd.internal.v1.opt",
    "io.containerd.internal.v1.tracing",
    "io.containerd.monitor.v1.cgroups",
    "io.containerd.runtime.v1.linux",
    "io.containerd.runtime.v2.task",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.tracing.processor.v1.otlp",
]


@contextlib.contextmanager
def containerd_daemon(workdir: Path, name: str = "containerd") -> Iterator[Containerd]:
    """containerd with its root, state and sockets under `workdir` (needs root)."""
    program = require_tools("containerd", "ctr")["containerd"]
    base = workdir / name
    base.mkdir(parents=True, exist_ok=True)
    address = str(base / "containerd.sock")
    config = "\n".join([
        "version = 2",
        f'root = "{base / "root"}"',
        f'state = "{base / "state"}"',
        f"disabled_plugins = {json.dumps(_CONTAINERD_DISABLED)}",
        "[grpc]",
        f'  address = "{address}"',
        "[ttrpc]",
        f'  address = "{base / "containerd.ttrpc.sock"}"',
        "",
    ])
    config_path = base / "config.toml"
    config_path.write_text(config)
    with running(name, [program, "--config", str(config_path)], base / "containerd.log") as process:
        daemon = Containerd(address, base / "root", process)
        wait_until(
            lambda: Path(address).exists() and daemon.ctr("version", timeout=10).returncode == 0,
            what=f"containerd at {address}", alive=process.check_alive,
        )
        yield daemon


# -- the paginating front of a registry -----------------------------------------------------


@dataclass
class PagingRegistry:
    """`paging_registry.py` in front of a real registry (see that file for why)."""

    url: str
    host: str
    log: RequestLog
    process: Process


@contextlib.contextmanager
def paging_registry(workdir: Path, registry: Registry, name: str = "paging",
                    manifest_map: bool = False) -> Iterator[PagingRegistry]:
    """The paginating front of `registry` on a free loopback port; `manifest_map`: tag lists carry Google's map."""
    base = workdir / name
    base.mkdir(parents=True, exist_ok=True)
    port = free_port()
    script = Path(__file__).with_name("paging_registry.py")
    log_path = base / "paging.log"
    argv = [sys.executable, str(script), registry.url, str(port)]
    if manifest_map:
        argv.append(str(registry.storage))
    with running(name, argv, log_path) as process:
        url = f"http://{LOOPBACK}:{port}"
        wait_for_http(process, url + "/v2/")
        yield PagingRegistry(url, f"{LOOPBACK}:{port}", RequestLog(log_path), process)
