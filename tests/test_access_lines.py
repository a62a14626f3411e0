"""Access lines as Cloud Logging reads them: user agent, bytes sent, protocol and span, the same on both engines.

Two real `archeio serve` processes, one per HTTP engine, with every request
logged (ARCHEIO_ACCESS_LOG=1), get the same raw requests, each on its own
connection read to its end, so the bytes each engine sent are known
exactly. Their access lines must be equal but for the latency and the
response size, and each response size must be the bytes that engine sent
(they differ only where the engines' answers are named to differ). The span id of X-Cloud-Trace-Context (decimal) is
written as Cloud Logging wants it (16 hexadecimal digits); a header that
does not carry one gives no span and never a wrong answer.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from archeio.http import httptools_impl
from archeio.logs import span_id

from . import engines
from .conftest import AWS_EU_WEST_3, GOOGLE_CLOUD, make_settings
from .ops_support import BLOB, LOAD_BALANCER, ArcheioProcess, ThreadedBucket, wait_for, write_mirrors

TRACE_ID = "105445aa7843bc8bf206b12000100000"
PROJECT = "demo-project"
BIG_SPAN = 12345678901234567890  # below 2**64: a valid span id


def request(target: str, *headers: str, version: str = "1.1", method: str = "GET") -> bytes:
    lines = [f"{method} {target} HTTP/{version}", "Host: registry.test", *headers, "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


XFF_AWS = f"X-Forwarded-For: {AWS_EU_WEST_3}, {LOAD_BALANCER}"
BLOB_PATH = f"/v2/pause/blobs/{BLOB}"

# (raw request, status): one of each kind of answer, with the headers an access line reads.
REQUESTS: list[tuple[bytes, int]] = [
    (request(BLOB_PATH, XFF_AWS, "User-Agent: containerd/v1.7.0",
             f"X-Cloud-Trace-Context: {TRACE_ID}/1;o=1"), 307),  # needs a HEAD first
    (request(BLOB_PATH, XFF_AWS, "User-Agent: containerd/v1.7.0",
             f"X-Cloud-Trace-Context: {TRACE_ID}/{BIG_SPAN};o=1"), 307),  # from the cache
    (request(BLOB_PATH, XFF_AWS, method="HEAD", version="1.0"), 307),
    (request("/v2/pause/manifests/3.10?ns=x", f"X-Forwarded-For: {GOOGLE_CLOUD}, {LOAD_BALANCER}",
             "User-Agent: skopeo/1.13 caf\xe9", f"X-Cloud-Trace-Context: {TRACE_ID}/abc;o=1"), 307),
    (request("/v2/", "User-Agent: GoogleHC/1.0", f"X-Cloud-Trace-Context: {TRACE_ID}/{2**64};o=1"), 200),
    (request("/v2/pause/manifests/.bad", "User-Agent: curl/8.0", "X-Cloud-Trace-Context: garbage"), 404),
]


def exchange_all(port: int, raw: bytes) -> bytes:
    """Send `raw` on a new connection and read everything until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(raw)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


@pytest.fixture(scope="module")
def answered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, list[tuple[bytes, dict[str, Any]]]]]:
    """Engine -> (the bytes it sent, its access line) for each request, in order."""
    tmp = tmp_path_factory.mktemp("access")
    results: dict[str, list[tuple[bytes, dict[str, Any]]]] = {}
    with ThreadedBucket() as bucket:
        for engine in engines.ENGINES:
            with engines.using(engine):
                env = {
                    "ARCHEIO_ACCESS_LOG": "1",
                    "ARCHEIO_TRACE_PROJECT": PROJECT,
                    "ARCHEIO_MIRRORS_FILE": str(write_mirrors(tmp / "mirrors.toml", {"eu-west-3": bucket.base("p")})),
                }
                with ArcheioProcess(tmp / f"{engine}.log", **env) as server:
                    responses = [exchange_all(server.port, raw) for raw, _ in REQUESTS]

                    def lines(server: ArcheioProcess = server) -> list[dict[str, Any]]:
                        return [e for e in server.log_entries() if e["logger"] == "archeio.access"]

                    wait_for(lambda: len(lines()) == len(REQUESTS), what=f"{engine}: one access line per request")
                    results[engine] = list(zip(responses, lines(), strict=True))
    yield results


def test_every_request_got_its_answer(answered: dict[str, list[tuple[bytes, dict[str, Any]]]]) -> None:
    for engine, pairs in answered.items():
        assert [status_of(response) for response, _ in pairs] == [status for _, status in REQUESTS], engine


def test_both_engines_write_the_same_line_but_for_latency_and_size(
    answered: dict[str, list[tuple[bytes, dict[str, Any]]]],
) -> None:
    def comparable(line: dict[str, Any]) -> dict[str, Any]:
        request = {k: v for k, v in line["httpRequest"].items() if k not in ("latency", "responseSize")}
        return {**{k: v for k, v in line.items() if k != "time"}, "httpRequest": request}

    for (_, lean), (_, other) in zip(answered["httptools"], answered["aiohttp"], strict=True):
        assert comparable(lean) == comparable(other)


def test_response_size_is_the_bytes_sent_headers_included(
    answered: dict[str, list[tuple[bytes, dict[str, Any]]]],
) -> None:
    for engine, pairs in answered.items():
        for response, line in pairs:
            assert line["httpRequest"]["responseSize"] == str(len(response)), (engine, response[:60])
    # The sizes differ only by the engines' named differences (docs/request-handling.md): aiohttp's
    # Server line, and the `Connection: close` it leaves out of an answer to HTTP/1.0.
    for (lean, _), (other, _) in zip(answered["httptools"], answered["aiohttp"], strict=True):
        lean_lines, other_lines = head_lines(lean), head_lines(other)
        assert {line.split(b":")[0] for line in other_lines - lean_lines} <= {b"Server"}
        assert lean_lines - other_lines <= {b"Connection: close"}


def head_lines(response: bytes) -> set[bytes]:
    """The header lines of a response, its Date's value left out."""
    head = response.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
    return {b"Date" if line.startswith(b"Date:") else line for line in head}


def test_line_carries_user_agent_and_protocol(answered: dict[str, list[tuple[bytes, dict[str, Any]]]]) -> None:
    lines = [line["httpRequest"] for _, line in answered["httptools"]]
    assert lines[0]["userAgent"] == "containerd/v1.7.0" and lines[0]["protocol"] == "HTTP/1.1"
    assert "userAgent" not in lines[2] and lines[2]["protocol"] == "HTTP/1.0"
    assert lines[2]["requestMethod"] == "HEAD"
    assert lines[3]["userAgent"] == "skopeo/1.13 caf\xe9"  # the header's bytes, as latin-1
    assert lines[4]["userAgent"] == "GoogleHC/1.0"


def test_line_carries_the_span_in_hexadecimal(answered: dict[str, list[tuple[bytes, dict[str, Any]]]]) -> None:
    lines = [line for _, line in answered["httptools"]]
    assert lines[0]["logging.googleapis.com/spanId"] == "0000000000000001"
    assert lines[1]["logging.googleapis.com/spanId"] == f"{BIG_SPAN:016x}"
    for line in lines[:2]:
        assert line["trace"] == TRACE_ID
        assert line["logging.googleapis.com/trace"] == f"projects/{PROJECT}/traces/{TRACE_ID}"
    # Not decimal, 2**64, no span at all: the trace stays, no span is made up.
    for line in lines[3:]:
        assert "logging.googleapis.com/spanId" not in line
    assert lines[3]["trace"] == TRACE_ID and lines[5]["trace"] == "garbage"


@pytest.mark.parametrize(
    ("header", "span"),
    [
        (b"105445aa7843bc8bf206b12000100000/1;o=1", "0000000000000001"),
        (b"t/18446744073709551615", "ffffffffffffffff"),
        (b"t/074;o=0", "000000000000004a"),
        (b"t/18446744073709551616;o=1", None),  # 2**64
        (b"t/0;o=1", None),
        (b"t/-1", None),
        (b"t/+1", None),
        (b"t/1_0", None),
        (b"t/1 ", None),
        (b"t/\xd9\xa1", None),  # an Arabic-Indic digit one: not ASCII
        (b"t/" + b"9" * 40, None),
        (b"t/", None),
        (b"t", None),
        (b"", None),
        (b"/5", "0000000000000005"),
    ],
)
def test_span_id_is_sixteen_hex_digits_or_none(header: bytes, span: str | None) -> None:
    assert span_id(header) == span


def test_lean_engine_reads_no_access_line_header_while_the_access_log_is_off() -> None:
    # Chosen at start-up: the usual protocol compares no User-Agent or trace header.
    import asyncio

    from archeio.app import RequestFlow
    from archeio.existence import BlobExistenceCache
    from iprange import load_index

    loop = asyncio.new_event_loop()
    try:
        for share, protocol in (("0", httptools_impl.HttpToolsProtocol), ("0.5", httptools_impl._LoggingProtocol)):
            settings = make_settings(ARCHEIO_ACCESS_LOG=share)
            flow = RequestFlow(settings, load_index(Path(__file__).parent / "data" / "ranges"),
                               BlobExistenceCache.from_settings(settings))
            engine = httptools_impl.HttpToolsEngine(flow, settings, loop)
            assert engine.protocol is protocol
    finally:
        loop.close()
