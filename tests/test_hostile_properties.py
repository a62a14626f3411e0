"""Property tests: for any request, a defined answer and only configured redirects.

Two levels, the same strategies:
- the pure decision (`Router.classify`, `RequestFlow.respond`/`decide_checked`, the
  range index and the X-Forwarded-For rule), cheap enough for many
  thousands of examples;
- real HTTP against an `archeio serve` process, raw bytes over a socket,
  the response read strictly (a CR or LF inside a header line fails).

The properties: the status is a defined one (never 5xx); every Location
starts with a configured base (upstream or signature registry + /v2/ +
path, a mirror or the default + /containers/images/, the info or privacy
URL) and is a correctly percent-encoded URL with no empty, dot, '@' or
backslash segment after the base.

Example counts: ARCHEIO_FUZZ_EXAMPLES sets the HTTP-level count (default
3,000 per test); the pure tests run as many, at least 5,000. The long run is
`ARCHEIO_FUZZ_EXAMPLES=200000 .venv/bin/python -m pytest tests/test_hostile_properties.py`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from archeio.app import PendingCheck, RequestFlow, make_flow
from archeio.clientip import client_ip
from archeio.config import Settings
from archeio.existence import BlobExistenceCache
from archeio.http.httptools_impl import KEEP, Wire
from archeio.routing import LocalAnswer, Route
from iprange import AWS, GCP, CloudIndex, InvalidAddress, Placement, load_index

from .reliability_support import (
    AWS_EU_WEST_3,
    DEFINED_STATUSES,
    GOOGLE_CLOUD,
    LOAD_BALANCER,
    NOBODY,
    SIGNATURE_UPSTREAM,
    ServerProcess,
    digest,
    exchange,
    location_problem,
    parse_response,
    served_process,
    server_env,
    settings_from,
)

HTTP_EXAMPLES = int(os.environ.get("ARCHEIO_FUZZ_EXAMPLES", "3000"))
PURE_EXAMPLES = max(HTTP_EXAMPLES, 5000)
# The suite's 300 s per test is for the default counts; a long run gets
# about 20 ms an example.
pytestmark = pytest.mark.timeout(300 + PURE_EXAMPLES // 50)

_fuzz = settings(
    max_examples=HTTP_EXAMPLES, deadline=None, derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
_fuzz_pure = settings(_fuzz, max_examples=PURE_EXAMPLES)

# -- strategies -------------------------------------------------------------

HEX64 = "0123456789abcdef" * 4
PRESENT_DIGEST = digest(1)  # held by the fake mirror

# Every byte value, as the latin-1 character the server decodes it to.
any_byte_text = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=255), max_size=40)

nasty_pieces = st.sampled_from([
    "..", ".", "", "%2e%2e", "%2E.", ".%2e", "%2F", "%2f", "%00", "%0d%0a", "%0D%0ALocation:%20http://evil.example",
    "@", "evil.example@", "user:pass@evil.example", "\\", "%5C", "%5c", "//", "http:", "https://evil.example",
    "%25", "%", "%zz", "%c0%af", "%e2%80%ae", "%ff", "\xe9", "\x00", "\r", "\n", "\r\n", " ", "\t", "#", "?", ";",
    "blobs", "manifests", "tags", "list", "referrers", "_catalog", "v2", "pause", "library", "a-b", "a__b", "A",
    "sha256:" + HEX64, "sha256:" + HEX64.upper(), "sha512:" + HEX64 * 2, "sha256-" + HEX64 + ".sig",
    "sha256-" + HEX64 + ".att", PRESENT_DIGEST, "md5:abc", "latest", "v1.0", "x" * 300, "%2F" * 50,
])
# Repository name components: valid ones and near misses.
valid_component = st.sampled_from(
    ["pause", "kube-proxy", "etcd", "a", "x1", "a.b", "a_b", "a__b", "a---b", "coredns", "v1.2", "0"]
)
component = st.one_of(
    valid_component, valid_component, valid_component,
    st.sampled_from(["A", "a..b", "a___b", "-a", "a-", ".a", "_a", "a%2Fb", "a b", "ä", "a%2F%2Fb", "%61"]),
)
segment = st.one_of(nasty_pieces, any_byte_text, component)
valid_name = st.lists(valid_component, min_size=1, max_size=4).map("/".join)
name = st.one_of(valid_name, valid_name, st.lists(component, min_size=1, max_size=4).map("/".join))
valid_reference = st.one_of(
    st.just(PRESENT_DIGEST), st.builds(lambda n: digest(n), st.integers(0, 2**256 - 1)),
    st.sampled_from(["latest", "v1.30.0", "_", "A.b-c", "x" * 128, "sha256-" + HEX64 + ".sig", "md5:abc"]),
)
reference = st.one_of(valid_reference, valid_reference, valid_reference, nasty_pieces)
# Mostly well-formed requests with something odd in them, so the redirect
# branches are reached, plus free-form nonsense.
well_formed_path = st.one_of(
    st.builds(lambda n, kind, ref: f"/v2/{n}/{kind}/{ref}", name,
              st.sampled_from(["blobs", "manifests", "referrers"]), reference),
    st.builds(lambda n: f"/v2/{n}/tags/list", name),
)
free_path = st.builds(
    lambda prefix, parts: prefix + "/".join(parts),
    st.sampled_from(["/v2/", "/", "/v2", "//v2/", "/privacy", "/privacy/", "", "*", "http://evil.example/v2/", "/V2/"]),
    st.lists(segment, max_size=8),
)
long_path = st.builds(
    lambda n, k: "/v2/" + "/".join([n] * k) + "/manifests/latest", name, st.sampled_from([1, 10, 60, 200, 400])
)
# Weighted towards well-formed paths, so a good share of examples reach a redirect.
path = st.one_of(well_formed_path, well_formed_path, well_formed_path, free_path, long_path)
query = st.one_of(
    st.just(""), st.just(""),
    st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40),
    any_byte_text,
    st.lists(nasty_pieces, max_size=6).map("&".join),
    st.builds(lambda n: "a=" + "%41" * n, st.sampled_from([0, 10, 1500, 3000])),
)
method = st.one_of(
    st.just("GET"), st.just("HEAD"),
    st.sampled_from(["POST", "PUT", "DELETE", "OPTIONS", "PATCH", "get", "TRACE", "CONNECT", "BREW", "GET "]),
)

address = st.one_of(
    st.sampled_from([AWS_EU_WEST_3, GOOGLE_CLOUD, NOBODY, "fe80::1%eth0", "fe80::1%25eth0", "::ffff:35.180.1.1",
                     "::ffff:23.20.0.1", "[::1]:8080", "[2600:1f18::1]", "35.180.1.1:443", "unknown", "", "::",
                     "0.0.0.0", "255.255.255.255", "1.2.3.4/8", "01.02.03.04", "35.180.1.1\x00", "\xff\xfe", "-"]),
    st.ip_addresses().map(str),
    any_byte_text,
)
separator = st.sampled_from([",", ", ", " ", ",,", " , ", "\t", ";"])
forwarded = st.one_of(
    st.none(),
    st.builds(lambda entries, sep: sep.join(entries), st.lists(address, max_size=6), separator),
    st.builds(lambda a, k: ", ".join([a] * k), address, st.sampled_from([20, 300])),
)

# -- the pure level -----------------------------------------------------------


@pytest.fixture(scope="module")
def configured(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    tmp = tmp_path_factory.mktemp("pure")
    return settings_from(server_env("http://127.0.0.4:9000/bucket", "http://127.0.0.5:9000/cdn", Path(tmp),
                                    SIGNATURE_UPSTREAM_ENDPOINT=SIGNATURE_UPSTREAM))


@pytest.fixture(scope="module")
def index() -> CloudIndex:
    return load_index(None)


PLACEMENTS = [None, Placement(AWS, "eu-west-3"), Placement(AWS, "us-east-1"), Placement(GCP, "us-central1"),
              Placement("Azure", "westeurope")]


@_fuzz_pure
@given(method=method, path=path, query=query, placement=st.sampled_from(PLACEMENTS),
       found=st.sampled_from([True, False, None]))
def test_router_answers_defined_status_and_redirects_only_to_configured_bases(
    configured: Settings, index: CloudIndex, method: str, path: str, query: str, placement: Placement | None,
    found: bool | None,
) -> None:
    flow = RequestFlow(configured, index, BlobExistenceCache.from_settings(configured))
    result = flow.router.classify(method, path)
    if isinstance(result, LocalAnswer):
        assert result.status in DEFINED_STATUSES
        if result.location is not None:
            assert location_problem(result.location, configured) is None
        return
    assert isinstance(result, Route)
    mirror = flow.router.mirror_for(placement)
    if result.digest is not None and mirror is not None and found is not None:
        pending = PendingCheck(method, path, query, result, placement, mirror, None)
        decision = flow.decide_checked(pending, found)
    else:
        decision = flow.router.upstream_location(result, query)
    problem = location_problem(decision.location, configured)
    assert problem is None, f"{problem}: {decision.location!r}"
    decision.location.encode("ascii")


@_fuzz_pure
@given(method=method, path=path, query=query, forwarded=forwarded,
       peer=st.sampled_from([None, "127.0.0.1", AWS_EU_WEST_3, "::1"]), found=st.booleans(),
       at_upstream=st.booleans())
def test_flow_decision_renders_as_well_framed_response_for_any_request(
    configured: Settings, index: CloudIndex, method: str, path: str, query: str,
    forwarded: str | None, peer: str | None, found: bool, at_upstream: bool,
) -> None:
    # The whole synchronous flow, X-Forwarded-For included, without sockets,
    # with the signature fallback (the settings have a signature upstream);
    # content needing a check is finished with each existence answer.
    flow = make_flow(configured, index, BlobExistenceCache.from_settings(configured))
    outcome = flow.respond(method, path, query, forwarded, peer)
    if isinstance(outcome, PendingCheck):
        outcome = flow.decide_checked(outcome, found, at_upstream)
    wire = Wire()
    if isinstance(outcome, LocalAnswer):
        rendered = wire.answer(outcome, method == "HEAD", KEEP)
    else:
        rendered = wire.redirect(outcome.location, KEEP)
    response, rest = parse_response(rendered, head=method == "HEAD")
    assert rest == b"" or method == "HEAD"
    assert response.status in DEFINED_STATUSES
    location = response.header("Location")
    if location is not None:
        assert location_problem(location, configured) is None, location


@_fuzz_pure
@given(text=st.one_of(address, st.text(max_size=60)))
def test_range_index_lookup_returns_placement_or_refuses_the_address(index: CloudIndex, text: str) -> None:
    try:
        placement = index.lookup(text)
    except InvalidAddress:
        return
    assert placement is None or isinstance(placement, Placement)


@_fuzz_pure
@given(value=forwarded, hops=st.integers(0, 3))
def test_client_ip_is_an_entry_never_invented(value: str | None, hops: int) -> None:
    found = client_ip(value, "203.0.113.9", hops)
    # Entries are separated by commas and HTTP's whitespace (space, tab) only.
    entries = re.split(r"[, \t]+", value.strip(", \t")) if value else []
    entries = [e for e in entries if e]
    if not entries:
        assert found == "203.0.113.9"
    elif found is not None:
        assert found == entries[-1 - hops]
    else:
        assert len(entries) <= hops


# -- real HTTP against a server process ----------------------------------------


@pytest.fixture(scope="module")
def served(engine: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Settings]]:
    with served_process(Path(tmp_path_factory.mktemp("http"))) as (server, configured, mirror):
        mirror.present.add(PRESENT_DIGEST)
        yield server, configured


def _check_answer(server: ServerProcess, raw: bytes, head: bool, configured: Settings) -> None:
    assert server.proc.poll() is None, f"the server exited ({server.proc.returncode}): {server.log[-5:]}"
    response = exchange(server.port, raw, head=head)
    event(f"status {response.status}")  # --hypothesis-show-statistics: how often each answer was reached
    assert response.status in DEFINED_STATUSES, response
    location = response.header("Location")
    if response.status == 307:
        assert location is not None
        problem = location_problem(location, configured)
        assert problem is None, f"{problem}: {location!r}"
    else:
        assert location is None


@_fuzz
@given(method=method, path=path, query=query, forwarded=forwarded)
def test_server_answers_any_request_with_defined_status_and_safe_location(
    served: tuple[ServerProcess, Settings], method: str, path: str, query: str, forwarded: str | None
) -> None:
    server, configured = served
    target = path + ("?" + query if query else "")
    lines = [f"{method} {target} HTTP/1.1", "Host: registry.test"]
    if forwarded is not None:
        lines.append("X-Forwarded-For: " + forwarded)
    lines.append("Connection: close")
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    _check_answer(server, raw, method == "HEAD", configured)


@_fuzz
@given(noise=st.binary(max_size=300), tail=st.sampled_from([b"", b"\r\n\r\n", b"\n\n"]))
def test_server_answers_arbitrary_bytes_with_a_defined_status(
    served: tuple[ServerProcess, Settings], noise: bytes, tail: bytes
) -> None:
    server, configured = served
    # Arbitrary bytes after a request start: the server either answers it
    # or waits for more (then the header timeout closes it); either way no
    # 5xx. An answer must come for the requests that are complete.
    raw = b"GET /v2/" + noise + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" + tail
    _check_answer(server, raw, False, configured)


@_fuzz
@given(entries=st.lists(address, min_size=0, max_size=4), repeat=st.integers(1, 3))
def test_server_combines_repeated_forwarded_headers_safely(
    served: tuple[ServerProcess, Settings], entries: list[str], repeat: int
) -> None:
    server, configured = served
    headers = "".join(f"X-Forwarded-For: {e}\r\n" for e in entries * repeat)
    raw = (f"GET /v2/pause/blobs/{PRESENT_DIGEST} HTTP/1.1\r\nHost: x\r\n{headers}"
           f"X-Forwarded-For: {LOAD_BALANCER}\r\nConnection: close\r\n\r\n").encode("latin-1")
    _check_answer(server, raw, False, configured)
