"""Shared parts of the reliability tests: a misbehaving mirror, servers, raw HTTP.

Used by tests/test_hostile_*.py, tests/test_failing_mirrors.py,
tests/test_abuse.py and tests/nginx_reference.py (and the benchmarks import
nothing from here: they use the server only through its command line and
HTTP).

- `FakeMirror` is a blob bucket on loopback whose behaviour a test changes
  while the server runs: answer, hang, reset the connection, return a
  status, answer slowly, or hold every HEAD until a gate opens. It counts
  the HEADs it gets per path (mirror + digest) and how many were in
  flight at once. With `redirect` set it answers a found digest with a
  307 to its own URL, as archeio does, so it can stand behind nginx for a
  request that waits (tests/nginx_reference.py).
- `running_server` runs the real `Server` in the test's event loop, so a
  test can look at its breaker and cache; `ServerProcess` runs
  `archeio serve` as a subprocess, for signals and for synchronous
  (hypothesis) tests.
- `parse_response` reads raw response bytes strictly, so the tests can see
  what an HTTP library would hide (a CR or LF inside a header line).

All traffic stays on 127.0.0.0/8; every process started here is stopped by
its PID, also when the test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from archeio.config import INFO_URL, PRIVACY_URL, Settings, load_settings
from archeio.server import Server

from . import engines

REPO = Path(__file__).resolve().parent.parent

# Configured bases. The upstream and signature registries are never
# contacted by the server (it only redirects there); loopback addresses
# keep even a mistaken client on this machine. `server_env` sets no
# signature upstream unless asked: with one of its own, the signature
# fallback would check content by digest at the upstream.
UPSTREAM = "http://127.0.0.2:5001"
SIGNATURE_UPSTREAM = "http://127.0.0.3:5002"
REGISTRY_PATH = "k8s-artifacts-prod/images"

# Client addresses (the embedded data places them so).
AWS_EU_WEST_3 = "35.180.1.1"
GOOGLE_CLOUD = "35.220.26.1"
NOBODY = "192.168.0.1"
LOAD_BALANCER = "127.0.0.1"

_LINGER_ZERO = b"\x01\x00\x00\x00\x00\x00\x00\x00"  # struct linger {on, 0 s}: close() sends RST

# Statuses the public port may answer with; anything else is a defect.
DEFINED_STATUSES = frozenset({200, 307, 400, 404, 405, 408, 413, 414, 431})

# Characters a correctly percent-encoded URL may hold (RFC 3986), with
# every '%' starting an escape of two hex digits.
_URL_RE = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?]|%[0-9A-Fa-f]{2})*")


def digest(n: int) -> str:
    """A well-formed sha256 digest, distinct for each n."""
    return "sha256:" + f"{n:064x}"


def blob_path(d: str, repo: str = "pause") -> str:
    return f"/v2/{repo}/blobs/{d}"


def xff(client: str) -> str:
    """X-Forwarded-For as Google's load balancer writes it."""
    return f"{client}, {LOAD_BALANCER}"


# -- the misbehaving mirror ---------------------------------------------------

OK = "ok"  # 200 for digests in `present`, 404 otherwise
HANG = "hang"  # read the request, never answer
RESET = "reset"  # close with a TCP reset
STATUS = "status"  # answer `status` to everything
SLOW = "slow"  # answer as OK after `delay` seconds
GATE = "gate"  # hold every HEAD until `release()`, then answer as OK


class _MirrorConnection(asyncio.Protocol):
    def __init__(self, mirror: FakeMirror) -> None:
        self.mirror = mirror
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.mirror.connections += 1

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = request_line.split(" ")
            path = parts[1] if len(parts) == 3 else ""
            asyncio.get_running_loop().create_task(self.mirror.answer(self, path))


class FakeMirror:
    """A blob bucket on 127.0.0.1 with switchable failures; see module docstring."""

    def __init__(self) -> None:
        self.mode = OK
        self.status = 500
        self.delay = 0.0
        self.present: set[str] = set()
        # Answer a found digest 307 to <url>/containers/images/<digest> rather than 200.
        self.redirect = False
        self.heads: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.connections = 0
        self._gate: asyncio.Event | None = None
        self._server: asyncio.AbstractServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/bucket"

    @property
    def total_heads(self) -> int:
        return sum(self.heads.values())

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._gate = asyncio.Event()
        self._server = await self._loop.create_server(
            lambda: _MirrorConnection(self), "127.0.0.1", 0, backlog=1024
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self.release()
            self._server = None

    def release(self) -> None:
        """Open the gate: held HEADs are answered (thread-safe)."""
        if self._loop is not None and self._gate is not None:
            self._loop.call_soon_threadsafe(self._gate.set)

    async def answer(self, conn: _MirrorConnection, path: str) -> None:
        name = path.rsplit("/", 1)[-1]
        self.heads[path] += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            mode = self.mode
            if mode == HANG:
                await asyncio.Event().wait()  # until the client gives up
            if mode == RESET:
                self._reset(conn)
                return
            if mode == GATE:
                assert self._gate is not None
                await self._gate.wait()
            if mode == SLOW:
                await asyncio.sleep(self.delay)
            if mode == STATUS:
                status = self.status
            else:
                status = 200 if name in self.present else 404
            location = b""
            if self.redirect and status == 200:
                status = 307
                location = f"Location: {self.url}/containers/images/{name}\r\n".encode()
            if conn.transport is not None and not conn.transport.is_closing():
                conn.transport.write(b"HTTP/1.1 %d X\r\n%sContent-Length: 0\r\n\r\n" % (status, location))
        finally:
            self.in_flight -= 1

    @staticmethod
    def _reset(conn: _MirrorConnection) -> None:
        transport = conn.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Linger 0: close() sends RST instead of FIN.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
        transport.abort()


@contextlib.contextmanager
def mirror_in_thread() -> Iterator[FakeMirror]:
    """A FakeMirror on its own event loop thread, for synchronous tests."""
    mirror = FakeMirror()
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(mirror.start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, name="fake-mirror", daemon=True)
    thread.start()
    if not ready.wait(30):
        raise RuntimeError("fake mirror did not start")
    try:
        yield mirror
    finally:
        asyncio.run_coroutine_threadsafe(mirror.close(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


# -- settings and servers -----------------------------------------------------


def server_env(mirror_url: str, default_url: str, tmp: Path, **overrides: str) -> dict[str, str]:
    """The environment of a test server: everything on loopback."""
    mirrors = tmp / "mirrors.toml"
    mirrors.write_text(f'[mirrors.AWS]\n"eu-west-3" = "{mirror_url}"\n')
    env = {
        "PORT": "0",
        "ARCHEIO_HOST": "127.0.0.1",
        "UPSTREAM_REGISTRY_ENDPOINT": UPSTREAM,
        "UPSTREAM_REGISTRY_PATH": REGISTRY_PATH,
        "DEFAULT_AWS_BASE_URL": default_url,
        "ARCHEIO_MIRRORS_FILE": str(mirrors),
        "ARCHEIO_LOG_LEVEL": "info",
        "ARCHEIO_HTTP": engines.current(),
        # No admin port: servers of parallel tests would all want 9090.
        "ARCHEIO_ADMIN_PORT": "0",
    }
    env.update(overrides)
    return env


def free_port() -> int:
    """A loopback port free right now (for the admin port, which takes no socket)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def allowed_prefixes(settings: Settings) -> tuple[str, ...]:
    """Every string a Location may start with, for this configuration."""
    path = settings.upstream_registry_path
    registry = "/v2/" + (path + "/" if path else "")
    bases = [settings.upstream_registry_endpoint + registry, settings.default_aws_base_url + "/containers/images/"]
    if settings.signature_upstream_endpoint:
        bases.append(settings.signature_upstream_endpoint + registry)
    bases += [url + "/containers/images/" for url in settings.mirrors.all_urls()]
    return tuple(bases)


def location_problem(location: str, settings: Settings) -> str | None:
    """Why `location` is not an allowed redirect, or None when it is."""
    if location in (settings.info_url, settings.privacy_url, INFO_URL, PRIVACY_URL):
        return None
    if not _URL_RE.fullmatch(location):
        return "not a correctly percent-encoded URL"
    prefix = next((p for p in allowed_prefixes(settings) if location.startswith(p)), None)
    if prefix is None:
        return "not under a configured base"
    parts = urlsplit(location)
    expected = urlsplit(prefix)
    if (parts.scheme, parts.netloc) != (expected.scheme, expected.netloc):
        return "host differs from the configured base"
    rest = location[len(prefix):].split("?", 1)[0]
    segments = rest.split("/")
    if any(s in ("", ".", "..") for s in segments):
        return "empty or dot segment after the base"
    if any(c in rest for c in "%@\\"):
        return "escape, '@' or backslash in the path after the base"
    return None


@contextlib.asynccontextmanager
async def running_server(settings: Settings, grace: float = 2.0) -> AsyncIterator[Server]:
    """The real server in this event loop, on a free loopback port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    sock.setblocking(False)
    server = Server(settings, grace=grace)
    task = asyncio.get_running_loop().create_task(server.run(sock=sock))
    try:
        while server.port is None:
            if task.done():
                task.result()  # raises what stopped it
                raise RuntimeError("server stopped before serving")
            await asyncio.sleep(0.01)
        yield server
    finally:
        server.stopping.set()
        await asyncio.wait_for(task, grace + 30)


@contextlib.asynccontextmanager
async def server_with_mirror(tmp_path: Path, **env: str) -> AsyncIterator[tuple[Server, FakeMirror]]:
    mirror = FakeMirror()
    await mirror.start()
    settings = settings_from(server_env(mirror.url, mirror.url.replace("/bucket", "/cdn"), tmp_path, **env))
    try:
        async with running_server(settings) as server:
            yield server, mirror
    finally:
        await mirror.close()


def port_of(server: Server) -> int:
    assert server.port is not None
    return server.port


def settings_from(env: dict[str, str]) -> Settings:
    return load_settings(env=env)


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll `condition` (no fixed sleep); fail naming `what` if it never holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


class ServerProcess:
    """`archeio serve` as a subprocess; its port comes from its start-up log."""

    def __init__(self, env: dict[str, str]) -> None:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("ARCHEIO_", "UPSTREAM_"))}
        full_env.update(env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "archeio", "serve"], env=full_env, cwd=REPO,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        self.log: list[dict[str, object]] = []
        self.port = 0
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        if not self._ready.wait(60) or not self.port:
            self.stop()
            raise RuntimeError(f"archeio serve did not start: {self.log[-5:]}")

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            try:
                entry = json.loads(raw)
            except ValueError:
                entry = {"message": raw.decode(errors="replace").rstrip()}
            self.log.append(entry)
            message = str(entry.get("message", ""))
            if message.startswith("serving on "):
                self.port = int(message.rsplit(":", 1)[1])
                self._ready.set()
        self._ready.set()

    def messages(self) -> list[str]:
        return [str(e.get("message", "")) for e in list(self.log)]

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def served_process(tmp: Path, **env: str) -> Iterator[tuple[ServerProcess, Settings, FakeMirror]]:
    """`archeio serve` whose eu-west-3 mirror (/bucket) and default (/cdn) are one FakeMirror."""
    with mirror_in_thread() as mirror:
        full_env = server_env(mirror.url, mirror.url.replace("/bucket", "/cdn"), tmp, **env)
        with ServerProcess(full_env) as server:
            yield server, settings_from(full_env), mirror


# -- raw HTTP -------------------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    version: str = "1.1"

    @property
    def announces_close(self) -> bool:
        """Does the response say the connection closes after it (explicitly, or by HTTP/1.0)?"""
        connection = (self.header("Connection") or "").lower()
        return connection == "close" or (self.version != "1.1" and connection != "keep-alive")

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        return next((v for n, v in self.headers if n.lower() == lowered), None)


class Incomplete(Exception):
    """More bytes are needed to read one whole response."""


def parse_response(data: bytes, head: bool) -> tuple[RawResponse, bytes]:
    """One response from the start of `data`, strictly; and the bytes after it.

    Raises Incomplete when `data` ends early and AssertionError when the
    bytes break HTTP/1.1 framing: a bare CR or LF inside a line, a header
    line without a colon, a missing or bad Content-Length.
    """
    end = data.find(b"\r\n\r\n")
    if end < 0:
        raise Incomplete
    lines = data[:end].split(b"\r\n")
    for line in lines:
        assert b"\r" not in line and b"\n" not in line, f"CR or LF inside a response line: {line!r}"
    match = re.fullmatch(engines.status_line(), lines[0])
    assert match, f"bad status line {lines[0]!r}"
    response = RawResponse(int(match[1]), version=lines[0][5:8].decode())
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        assert sep and name and name.strip() == name, f"bad header line {line!r}"
        assert all(0x20 <= b < 0x7F or b == 0x09 for b in value), f"control byte in header {line!r}"
        response.headers.append((name.decode("ascii"), value.strip().decode("ascii")))
    length_text = response.header("Content-Length")
    assert length_text is not None and length_text.isdigit(), "no Content-Length"
    length = 0 if head else int(length_text)
    start = end + 4
    if len(data) < start + length:
        raise Incomplete
    response.body = data[start : start + length]
    return response, data[start + length :]


def request_bytes(method: str, target: str, forwarded: str | None = None, close: bool = True) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: registry.test"]
    if forwarded is not None:
        lines.append(f"X-Forwarded-For: {forwarded}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def exchange(port: int, raw: bytes, head: bool = False, timeout: float = 30.0) -> RawResponse:
    """Send raw bytes on a new connection; the first response, read strictly.

    Stops reading once one whole response is in, so bytes the server is
    still waiting to complete (a second, unfinished request) cost nothing.
    Raises AssertionError if the server closes without a whole answer.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        # Close with a reset, so no side keeps the connection in TIME_WAIT:
        # hundreds of thousands of examples would otherwise exhaust the
        # loopback ports and make connections fail for the wrong reason.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
        with contextlib.suppress(OSError):  # the server may answer and close before all is sent
            sock.sendall(raw)
        data = b""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return parse_response(data, head)[0]
            except Incomplete:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([sock], [], [], remaining)[0]:
                raise AssertionError(f"no whole answer within {timeout} s; got {data[:200]!r}")
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise AssertionError(f"connection closed without a whole answer; got {data[:200]!r}")
            data += chunk


class AsyncClient:
    """One keep-alive client connection speaking raw HTTP/1.1, for async tests."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._data = b""

    @classmethod
    async def connect(cls, port: int) -> AsyncClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, raw: bytes) -> None:
        self.writer.write(raw)
        await self.writer.drain()

    async def read_response(self, head: bool = False) -> RawResponse:
        """The next response; raises ConnectionError naming how many bytes came if it ends early."""
        while True:
            try:
                response, self._data = parse_response(self._data, head)
                return response
            except Incomplete:
                pass
            try:
                chunk = await self.reader.read(65536)
            except ConnectionResetError:
                chunk = b""  # a reset is a close: what counts is how much of an answer came
            if not chunk:
                raise ConnectionError(f"closed after {len(self._data)} bytes of a response")
            self._data += chunk

    async def get(self, target: str, forwarded: str | None = None, method: str = "GET") -> RawResponse:
        await self.send(request_bytes(method, target, forwarded, close=False))
        return await self.read_response(head=method == "HEAD")

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


async def fetch(port: int, target: str, forwarded: str | None = None) -> RawResponse:
    """One GET on its own connection."""
    client = await AsyncClient.connect(port)
    try:
        return await client.get(target, forwarded)
    finally:
        await client.close()


async def closed_by_server(client: AsyncClient, timeout: float = 30) -> bool:
    """True once the server has closed this connection (EOF or reset); False if it does not within `timeout`."""
    try:
        async with asyncio.timeout(timeout):
            while await client.reader.read(65536):
                pass
    except ConnectionError:
        return True  # a reset is a close too
    except TimeoutError:
        return False
    return True
