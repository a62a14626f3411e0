"""The two engines give the same answer to the same bytes, or differ by a named exception.

The same hypothesis-generated raw requests (methods, paths, queries,
X-Forwarded-For lines, framing) go to two `archeio serve` processes that
differ only in ARCHEIO_HTTP; each pair of answers must agree on status and
Location. Where the engines legitimately differ, `known_difference` names
the difference; docs/request-handling.md ("Where the engines differ")
explains each name, and nothing else may differ.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from . import engines
from .reliability_support import (
    LOAD_BALANCER,
    ServerProcess,
    exchange,
    mirror_in_thread,
    server_env,
)
from .test_hostile_properties import PRESENT_DIGEST, address, forwarded, method, path, query

EXAMPLES = int(os.environ.get("ARCHEIO_DIFFERENTIAL_EXAMPLES", "2000"))
MAX_HEADER_BYTES = 16384  # ARCHEIO_MAX_HEADER_BYTES's default, which both servers run with
pytestmark = pytest.mark.timeout(300 + EXAMPLES // 20)

Answer = tuple[int, str | None] | str  # (status, Location), or why there was none


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    tmp = Path(tmp_path_factory.mktemp("differential"))
    with mirror_in_thread() as mirror:
        mirror.present.add(PRESENT_DIGEST)
        env = server_env(mirror.url, mirror.url.replace("/bucket", "/cdn"), tmp)
        with ServerProcess({**env, "ARCHEIO_HTTP": "httptools"}) as lean, \
                ServerProcess({**env, "ARCHEIO_HTTP": "aiohttp"}) as other:
            yield lean, other


def answer(server: ServerProcess, engine: str, raw: bytes, head: bool) -> Answer:
    assert server.proc.poll() is None, f"the {engine} server exited: {server.log[-5:]}"
    with engines.using(engine):
        try:
            response = exchange(server.port, raw, head=head, timeout=10)
        except AssertionError as exc:
            return "no answer: " + str(exc)[:60]
    return response.status, response.header("Location")


def known_difference(raw: bytes, lean: Answer, other: Answer) -> str | None:
    """The name of the documented difference this pair shows, or None."""
    if not (isinstance(lean, tuple) and isinstance(other, tuple)):
        return None
    method, _, rest = raw.partition(b" ")
    statuses = (lean[0], other[0])
    if statuses == (414, 400):
        return "request-line-limit"
    head = raw.split(b"\r\n\r\n", 1)[0]
    header_bytes = len(head) - len(head.split(b"\r\n", 1)[0])
    if lean[0] == 431 and header_bytes > MAX_HEADER_BYTES:
        # aiohttp limits each name and value, not all of them: it answers the request (or 400s a long one).
        return "header-size-limit"
    target = rest.lstrip(b" ").split(b" ", 1)[0]
    if other[0] == 400 and lean[0] in (404, 405) and target.startswith(b"*") and (method, target) != (
        b"OPTIONS", b"*"
    ):
        return "asterisk-form"
    if statuses == (405, 400) and method == b"CONNECT":
        return "connect-target"
    return None


def compare(servers: tuple[ServerProcess, ServerProcess], raw: bytes, head: bool) -> None:
    lean = answer(servers[0], "httptools", raw, head)
    other = answer(servers[1], "aiohttp", raw, head)
    if lean == other:
        event(f"same: {lean[0] if isinstance(lean, tuple) else 'no answer'}")
        return
    name = known_difference(raw, lean, other)
    assert name is not None, f"httptools {lean!r} vs aiohttp {other!r} for {raw[:300]!r}"
    event(f"named difference: {name}")


_examples = settings(
    max_examples=EXAMPLES, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

version = st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.1", "HTTP/1.0"])
# Host lines (RFC 9112 3.2): mostly one good one; none, two, or values that
# are not `host [":" port]` must get 400 from both engines.
host_value = st.one_of(
    st.sampled_from(["registry.test", "registry.test:443", "127.0.0.1", "[::1]:8080", "", "[v1.x]"]),
    st.text(alphabet="az09.-:[]@/%_~! ", max_size=16),
)
host_lines = st.one_of(
    st.just(["registry.test"]), st.just(["registry.test"]), st.just(["registry.test"]),
    st.lists(host_value, max_size=2),
)
extra_header = st.sampled_from([
    None, None, None, "Content-Length: 0", "Accept: */*", "User-Agent: containerd/1.7",
    "X-Cloud-Trace-Context: 105445aa7843bc8bf206b12000100000/1;o=1", "Connection: keep-alive",
])


@_examples
@given(method=method, path=path, query=query, lines=st.lists(forwarded, max_size=3),
       version=version, extra=extra_header, hosts=host_lines)
def test_both_engines_answer_any_request_alike(
    servers: tuple[ServerProcess, ServerProcess], method: str, path: str, query: str,
    lines: list[str | None], version: str, extra: str | None, hosts: list[str],
) -> None:
    target = path + ("?" + query if query else "")
    headers = [f"Host: {host}" for host in hosts]
    headers += [f"X-Forwarded-For: {line}" for line in lines if line is not None]
    if extra is not None:
        headers.append(extra)
    headers.append("Connection: close")
    raw = ("\r\n".join([f"{method} {target} {version}", *headers]) + "\r\n\r\n").encode("latin-1")
    compare(servers, raw, method == "HEAD")


@_examples
@given(entries=st.lists(address, max_size=4), split=st.integers(0, 4))
def test_both_engines_take_the_same_client_from_repeated_forwarded_lines(
    servers: tuple[ServerProcess, ServerProcess], entries: list[str], split: int,
) -> None:
    # The load balancer's entry last; the rest split over one or more lines.
    entries = [*entries, LOAD_BALANCER]
    lines = [", ".join(entries[:split]), ", ".join(entries[split:])]
    headers = "".join(f"X-Forwarded-For: {line}\r\n" for line in lines if line)
    raw = (f"GET /v2/pause/blobs/{PRESENT_DIGEST} HTTP/1.1\r\nHost: x\r\n{headers}"
           "Connection: close\r\n\r\n").encode("latin-1")
    compare(servers, raw, False)
