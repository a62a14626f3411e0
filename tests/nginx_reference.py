"""nginx as the reference for how many answers reach a client, and a raw client that counts them.

tests/test_connection_reference.py runs each of its rows against three
targets: `archeio serve` on each HTTP engine, and nginx configured here to
answer the same requests with the same statuses and Locations:

- `/v2/` 200 `{}`, `/v2/_catalog` 404, a manifest 307 upstream (`return`);
- a blob: `proxy_pass` to a FakeMirror that answers after the same delay
  as archeio's mirror check takes, with the 307 archeio would give (the
  stand-in for a request that waits on a check);
- `keepalive_requests` above the longest pipeline of the table, and
  `lingering_time`/`lingering_timeout` equal to archeio's lingering-close
  defaults (issue 17: ARCHEIO_LINGER_TIMEOUT 2 s, ARCHEIO_LINGER_BYTES
  64 KiB; nginx bounds lingering by time only).

Each nginx runs with its own config, pid file and logs under the test's
temporary directory, on a free loopback port, and is stopped by its PID
(tests/integration/services.py `running`), also when the test fails.

`RawClient` speaks HTTP/1.1 over a plain socket, as a client or proxy
does on the wire: it sends from a thread (a server that stops reading
cannot stall the reader), optionally half-closes, optionally reads slowly
through a small receive buffer, and reports the whole answers it got, in
order, and how the connection ended: EOF, reset, or still open at its
deadline.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import select
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import engines
from .integration import services
from .reliability_support import (
    AWS_EU_WEST_3,
    REGISTRY_PATH,
    SLOW,
    UPSTREAM,
    FakeMirror,
    Incomplete,
    RawResponse,
    blob_path,
    digest,
    mirror_in_thread,
    parse_response,
    request_bytes,
    served_process,
    xff,
)

# archeio's lingering-close defaults (issue 17), as nginx spells them.
LINGER = "2s"
# Requests nginx answers on one connection before it closes it: above the
# longest pipeline of the table (1,501), where archeio has no such limit.
KEEPALIVE_REQUESTS = 10_000
CATALOG_BODY = '{"errors": [{"code": "UNSUPPORTED", "message": "the catalog API is not supported"}]}'

_NGINX_CONF = """\
daemon off;
# A master process: the graceful stop (SIGQUIT) is the master's; nginx
# without one exits at once on any stop signal.
worker_processes 1;
pid {base}/nginx.pid;
error_log {base}/error.log info;
events {{ worker_connections {worker_connections}; }}
http {{
    access_log {base}/access.log;
{temp_paths}
    keepalive_requests {keepalive_requests};
    lingering_close on;
    lingering_time {linger};
    lingering_timeout {linger};
    server {{
        listen {host}:{port};
        location = /v2/ {{ default_type application/json; return 200 '{{}}'; }}
        location = /v2/_catalog {{ default_type application/json; return 404 '{catalog}'; }}
        location ~ ^/v2/(?<name>[^/]+)/manifests/(?<tag>[^/]+)$ {{
            return 307 {upstream}/v2/{registry_path}/$name/manifests/$tag;
        }}
        location ~ ^/v2/[^/]+/blobs/(?<digest>[^/]+)$ {{
            proxy_pass {mirror}/containers/images/$digest;
            # archeio's check is the server's own work (its answer is
            # cached for every client), not the client's to cancel: a FIN
            # while it runs must not abandon it. nginx's default (off)
            # takes a FIN during a proxied request for an abort.
            proxy_ignore_client_abort on;
        }}
        location = /nginx-status {{ stub_status; }}
    }}
}}
"""

EOF = "EOF"
RESET = "reset"
OPEN = "still open"

SLOW_RCVBUF = 4096  # the slow reader's receive buffer, set before connecting
SLOW_READ = 2048  # bytes it takes at a time ...
SLOW_PAUSE = 0.005  # ... every 5 ms
TRICKLE_PIECE = 64  # bytes a client sends after each read while it goes on sending

Answer = tuple[int, str | None]  # status, Location


def manifest(n: int | str, close: bool = False) -> bytes:
    return request_bytes("GET", f"/v2/pause/manifests/{n}", close=close)


def manifest_answer(n: int | str) -> Answer:
    return 307, f"{UPSTREAM}/v2/{REGISTRY_PATH}/pause/manifests/{n}"


def v2(close: bool = False) -> bytes:
    return request_bytes("GET", "/v2/", close=close)


V2_ANSWER: Answer = (200, None)


def catalog(close: bool = False) -> bytes:
    return request_bytes("GET", "/v2/_catalog", close=close)


CATALOG_ANSWER: Answer = (404, None)


# -- the targets --------------------------------------------------------------


@dataclass
class Target:
    """One server under test and the slow mirror behind its blob requests."""

    name: str  # "httptools", "aiohttp" or "nginx"
    port: int
    mirror: FakeMirror
    graceful_stop: Callable[[], None]
    # Client connections the server holds right now.
    open_connections: Callable[[], int]
    _blobs: Iterator[int] = field(default_factory=itertools.count)

    @property
    def is_nginx(self) -> bool:
        return self.name == "nginx"

    def slow_blob(self) -> tuple[bytes, Answer]:
        """A blob GET whose answer waits on the mirror (a digest not asked before), and its answer."""
        d = digest(next(self._blobs))
        self.mirror.present.add(d)
        request = request_bytes("GET", blob_path(d), xff(AWS_EU_WEST_3), close=False)
        return request, (307, f"{self.mirror.url}/containers/images/{d}")

    def parse(self, data: bytes) -> tuple[list[RawResponse], bytes]:
        """Every whole answer in `data`, strictly, and the bytes after the last one."""
        # nginx always says HTTP/1.1, as the lean engine does.
        with engines.using("httptools" if self.is_nginx else self.name):
            responses = []
            while data:
                try:
                    response, data = parse_response(data, head=False)
                except Incomplete:
                    break
                responses.append(response)
        return responses, data


@contextlib.contextmanager
def archeio_target(engine: str, tmp: Path, delay: float, **env: str) -> Iterator[Target]:
    """`archeio serve` on `engine`; its mirror answers the check after `delay` seconds."""
    admin = services.free_port()
    with served_process(
        tmp, ARCHEIO_HTTP=engine, ARCHEIO_HEAD_TIMEOUT="30", ARCHEIO_ADMIN_HOST=services.LOOPBACK,
        ARCHEIO_ADMIN_PORT=str(admin), **env,
    ) as (server, _settings, mirror):
        mirror.mode, mirror.delay = SLOW, delay
        metrics = f"http://{services.LOOPBACK}:{admin}/metrics"
        # The admin port may come up just after the public port says it serves.
        services.wait_until(lambda: services.http_status(metrics) == 200, what=f"archeio's metrics at {metrics}")
        yield Target(engine, server.port, mirror, server.terminate, lambda: _archeio_connections(metrics))


_CONNECTIONS_GAUGE = re.compile(r"^archeio_connections\{[^}]*\} (\S+)$", re.M)


def _archeio_connections(metrics_url: str) -> int:
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    return int(sum(float(v) for v in _CONNECTIONS_GAUGE.findall(text)))


@contextlib.contextmanager
def nginx_target(tmp: Path, delay: float, worker_connections: int) -> Iterator[Target]:
    """The reference nginx; its blob location waits `delay` seconds on a FakeMirror."""
    with mirror_in_thread() as mirror:
        mirror.mode, mirror.delay, mirror.redirect = SLOW, delay, True
        with reference_nginx(tmp, mirror.url, worker_connections) as (process, port):
            status_url = f"http://{services.LOOPBACK}:{port}/nginx-status"
            yield Target(
                "nginx", port, mirror, lambda: process.popen.send_signal(signal.SIGQUIT),
                lambda: _nginx_connections(status_url),
            )


_ACTIVE = re.compile(r"Active connections: (\d+)")


def _nginx_connections(status_url: str) -> int:
    with urllib.request.urlopen(status_url, timeout=10) as response:
        text = response.read().decode()
    match = _ACTIVE.search(text)
    assert match, text
    return int(match[1]) - 1  # not counting the connection that asks


@contextlib.contextmanager
def reference_nginx(tmp: Path, mirror_url: str, worker_connections: int) -> Iterator[tuple[services.Process, int]]:
    """nginx answering as archeio does (module docstring), on a free loopback port."""
    program = services.require_tools("nginx")["nginx"]
    base = tmp / "nginx"
    base.mkdir(parents=True, exist_ok=True)
    port = services.free_port()
    config = base / "nginx.conf"
    config.write_text(_NGINX_CONF.format(
        base=base, temp_paths=services.nginx_temp_paths(base), host=services.LOOPBACK, port=port,
        worker_connections=worker_connections, keepalive_requests=KEEPALIVE_REQUESTS, linger=LINGER,
        catalog=CATALOG_BODY, upstream=UPSTREAM, registry_path=REGISTRY_PATH, mirror=mirror_url,
    ))
    argv = [program, "-p", str(base), "-e", str(base / "error.log"), "-c", str(config)]
    with services.running("nginx", argv, base / "nginx.out") as process:
        services.wait_for_http(process, f"http://{services.LOOPBACK}:{port}/v2/")
        yield process, port


def promptly(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll `condition` every half millisecond: for acting the moment something happens."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.0005)


# -- the raw client -------------------------------------------------------------


@dataclass
class Outcome:
    """What one connection delivered: whole answers in order, and how it ended."""

    responses: list[RawResponse]
    end: str  # EOF, RESET or OPEN
    rest: bytes  # bytes after the last whole answer
    send_error: OSError | None

    @property
    def answers(self) -> list[Answer]:
        return [(r.status, r.header("Location")) for r in self.responses]

    def __str__(self) -> str:
        partial = f" ({len(self.rest)} bytes of a partial answer)" if self.rest else ""
        return f"{len(self.responses)} answers, then {self.end}{partial}"


class RawClient:
    """One client connection on a plain socket (module docstring)."""

    def __init__(self, target: Target, *, rcvbuf: int | None = None) -> None:
        self.target = target
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            # Before connecting: the window the client announces depends on it.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect((services.LOOPBACK, target.port))
        self._sender: threading.Thread | None = None
        self._send_error: OSError | None = None

    def send(self, data: bytes, *, shut_write: bool = False) -> None:
        """Send `data` in the background, then `shutdown(SHUT_WR)` if asked."""
        def run() -> None:
            try:
                self.sock.sendall(data)
                if shut_write:
                    self.sock.shutdown(socket.SHUT_WR)
            except OSError as exc:  # the server closed first: what counts is what was answered
                self._send_error = exc

        self._sender = threading.Thread(target=run, name="raw-client-send", daemon=True)
        self._sender.start()

    def wait_sent(self, timeout: float = 30.0) -> None:
        if self._sender is not None:
            self._sender.join(timeout)

    def read_to_end(self, *, slow: bool = False, trickle: bytes = b"", timeout: float = 20.0) -> Outcome:
        """Read until the server ends the connection (or `timeout`).

        slow: 2 KiB every 5 ms. trickle: once everything given to `send`
        is sent, more bytes, `TRICKLE_PIECE` of them after each read, as a
        client that goes on sending while it reads does; the server has to
        take them while it still owes answers, and after.
        """
        data = bytearray()
        end = OPEN
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            if trickle and self._sender is not None and not self._sender.is_alive():
                trickle = self._send_piece(trickle)
            if not select.select([self.sock], [], [], remaining)[0]:
                break
            try:
                chunk = self.sock.recv(SLOW_READ if slow else 65536)
            except ConnectionResetError:
                end = RESET
                break
            if not chunk:
                end = EOF
                break
            data += chunk
            if slow:
                time.sleep(SLOW_PAUSE)  # the client's pace, not a wait for the server
        self.wait_sent()
        if isinstance(self._send_error, ConnectionResetError | BrokenPipeError):
            # A reset the sending side saw first: recv then reports a plain EOF.
            end = RESET
        responses, rest = self.target.parse(bytes(data))
        return Outcome(responses, end, rest, self._send_error)

    def _send_piece(self, trickle: bytes) -> bytes:
        """Send the next piece of `trickle` if the socket takes it now; what is left to send."""
        try:
            sent = self.sock.send(trickle[:TRICKLE_PIECE], socket.MSG_DONTWAIT)
        except BlockingIOError:
            return trickle
        except OSError as exc:
            self._send_error = exc
            return b""
        return trickle[sent:]

    def close(self) -> None:
        self.wait_sent()
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
