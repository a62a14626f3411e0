"""Shared parts of the operations tests (tests/test_ops_*.py).

- `ThreadedBucket`: a blob mirror on loopback in a thread (so synchronous
  tests and module-scoped fixtures can use it), answering
  `HEAD /<prefix>/containers/images/<digest>`; `hold()` makes every HEAD
  wait until `release()`, to keep a request in flight.
- `ArcheioProcess`: `archeio serve` as a real subprocess on free loopback
  ports with its admin port, stderr captured to a file, always stopped by
  its PID (its workers stop with it: they watch their parent).
- `range_documents()`, `azure_document()`: the small hand-written feeds
  of tests/data/ranges, parsed, for a test to change and write out.
- `scrape()`: the admin port's /metrics parsed into samples.

Everything here talks to 127.0.0.1 only, and waits by polling, never by
fixed sleeps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from archeio.metrics import Snapshot

from . import engines
from .conftest import RANGES_FIXTURES, free_port

UPSTREAM = "http://127.0.0.2:5001"
REGISTRY_PATH = "k8s-artifacts-prod/images"
LOAD_BALANCER = "127.0.0.1"
BLOB = "sha256:" + "b" * 64
MISSING_BLOB = "sha256:" + "c" * 64


def xff(client: str) -> dict[str, str]:
    """Headers as Google's load balancer sends them: `<client>, <lb>`."""
    return {"X-Forwarded-For": f"{client}, {LOAD_BALANCER}"}


def wait_for(condition: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll `condition` until it returns something true; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# -- a mirror -------------------------------------------------------------


class ThreadedBucket:
    """A loopback blob mirror in a thread; 200 for blobs it holds, 404 otherwise."""

    def __init__(self) -> None:
        self.blobs: set[str] = {BLOB}
        self.heads: Counter[str] = Counter()
        self._gate = threading.Event()
        self._gate.set()
        bucket = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
                bucket.heads[self.path] += 1
                bucket._gate.wait(60)
                digest = self.path.rsplit("/", 1)[-1]
                self.send_response(200 if digest in bucket.blobs else 404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def base(self, prefix: str) -> str:
        return f"{self.url}/{prefix}"

    def hold(self) -> None:
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def __enter__(self) -> ThreadedBucket:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()


def write_mirrors(path: Path, regions: dict[str, str]) -> Path:
    """An ARCHEIO_MIRRORS_FILE with the given AWS region -> URL table."""
    lines = ["[mirrors.AWS]"] + [f'"{region}" = "{url}"' for region, url in regions.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


# -- range data -------------------------------------------------------------


def _fixture(name: str) -> dict[str, Any]:
    return json.loads((RANGES_FIXTURES / name).read_text())  # type: ignore[no-any-return]


def range_documents() -> tuple[dict[str, Any], dict[str, Any]]:
    """(AWS ip-ranges.json, Google cloud.json) of tests/data/ranges, parsed: the caller's own copies."""
    return _fixture("aws-ip-ranges.json"), _fixture("gcp-cloud.json")


def azure_document() -> dict[str, Any]:
    """Azure's Service Tags file of tests/data/ranges, parsed."""
    return _fixture("azure-service-tags.json")


def moved_region(aws: dict[str, Any], old: str, new: str, create_date: str) -> dict[str, Any]:
    """The AWS document with every `old` region entry now in `new`, published at `create_date`."""
    moved = dict(aws, createDate=create_date)
    for key in ("prefixes", "ipv6_prefixes"):
        moved[key] = [dict(e, region=new) if e.get("region") == old else e for e in aws.get(key, [])]
    return moved


def write_ranges(directory: Path, aws: dict[str, Any], gcp: dict[str, Any] | None = None) -> None:
    """Replace the range files in `directory` atomically, as `iprange update` does."""
    for name, doc in (("aws-ip-ranges.json", aws), ("gcp-cloud.json", gcp)):
        if doc is not None:
            tmp = directory / f".{name}.tmp"
            tmp.write_text(json.dumps(doc))
            os.replace(tmp, directory / name)


# -- the server process --------------------------------------------------------


class ArcheioProcess:
    """`archeio serve` on free loopback ports, with its admin port."""

    def __init__(self, log_path: Path, **env: str) -> None:
        self.log_path = log_path
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("ARCHEIO_", "UPSTREAM_"))}
        self.env.update({
            "ARCHEIO_HOST": "127.0.0.1",
            "ARCHEIO_ADMIN_HOST": "127.0.0.1",
            "ARCHEIO_ADMIN_PORT": "",
            "UPSTREAM_REGISTRY_ENDPOINT": UPSTREAM,
            "UPSTREAM_REGISTRY_PATH": REGISTRY_PATH,
            "ARCHEIO_HTTP": engines.current(),
        })
        self.env.update(env)
        self._new_ports()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, admin: bool = True) -> ArcheioProcess:
        """Start and wait until /readyz says ready (without `admin`: until /v2/ answers)."""
        for _attempt in range(3):
            with open(self.log_path, "wb") as log:
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "archeio", "serve"], env=self.env,
                    stdout=subprocess.DEVNULL, stderr=log,
                )
            try:
                wait_for(lambda: self._ready(admin), what=f"archeio to be ready; log: {self.log_path}")
                return self
            except AssertionError:
                # A free port can be taken as the source port of some connection
                # between our probe and the server's bind: try other ports.
                if "Address already in use" not in self.log():
                    raise
                self._new_ports()
        raise AssertionError(f"no free ports found:\n{self.log()}")

    def _new_ports(self) -> None:
        self.port, self.admin_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        self.env["PORT"] = str(self.port)
        if self.env["ARCHEIO_ADMIN_PORT"] != "0":
            self.env["ARCHEIO_ADMIN_PORT"] = str(self.admin_port)

    def _ready(self, admin: bool) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"archeio exited with {self.process.returncode}:\n{self.log()}")
        if admin:
            return admin_get(self, "/readyz")[0] == 200
        return http_get(self.url + "/v2/", timeout=10)[0] == 200

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL if it does not stop; the exit status."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        return process.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_entries(self) -> list[dict[str, Any]]:
        """Every complete stderr line, parsed as JSON (a line that is not JSON fails)."""
        text = self.log()
        return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]

    def __enter__(self) -> ArcheioProcess:
        if self.process is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- HTTP on loopback ------------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def http_get(url: str, headers: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of a GET, redirects not followed; status 0 if unreachable."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, {}, b""


def admin_get(server: ArcheioProcess, path: str) -> tuple[int, bytes]:
    status, _, body = http_get(server.admin_url + path, timeout=10)
    return status, body


def scrape(server: ArcheioProcess) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of the admin port's /metrics: (name, labels, value)."""
    status, body = admin_get(server, "/metrics")
    assert status == 200, status
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    ]


def total(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """The sum of the samples named `name` whose labels include `labels`."""
    return sum(
        value for sample, have, value in samples
        if sample == name and all(have.get(k) == v for k, v in labels.items())
    )


def blob_url(server: ArcheioProcess, digest: str = BLOB) -> str:
    return f"{server.url}/v2/pause/blobs/{digest}"


def requests_on_new_connections(urls_and_headers: Iterator[tuple[str, dict[str, str]]]) -> list[int]:
    """GET each URL on a fresh connection (so SO_REUSEPORT spreads them); the statuses."""
    return [http_get(url, headers)[0] for url, headers in urls_and_headers]


class SnapshotSource:
    """A metrics source of fixed snapshots (two workers configured, running and ready): the collector's input."""

    def __init__(self, snaps: list[Snapshot], restarts: int = 0) -> None:
        self.snaps = snaps
        self.restarts = restarts

    def snapshots(self) -> list[Snapshot]:
        return self.snaps

    def readiness(self) -> tuple[bool, str]:
        return True, "ready"

    def worker_counts(self) -> dict[str, int]:
        return {"configured": 2, "running": 2, "ready": 2, "restarts": self.restarts}
