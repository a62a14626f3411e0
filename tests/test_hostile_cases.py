"""Named nasty requests against a real `archeio serve`, one test id each.

Each row is raw bytes as an attacker (or a broken client or proxy) would
send them, the status we promise and, for a redirect, the exact Location.
The property tests (test_hostile_properties.py) search the space; this
table pins the cases worth naming, so a regression names itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from archeio.config import INFO_URL, PRIVACY_URL, Settings

from . import engines
from .reliability_support import (
    AWS_EU_WEST_3,
    GOOGLE_CLOUD,
    LOAD_BALANCER,
    NOBODY,
    REGISTRY_PATH,
    SIGNATURE_UPSTREAM,
    UPSTREAM,
    ServerProcess,
    digest,
    exchange,
    location_problem,
    served_process,
    xff,
)

# Every test here runs on each HTTP engine (tests/engines.py).
pytestmark = pytest.mark.usefixtures("engine")

HELD = digest(7)  # in the fake mirror (and the default mirror)
MISSING = digest(8)
SIG_TAG = "sha256-" + "ab" * 32 + ".sig"
UP = f"{UPSTREAM}/v2/{REGISTRY_PATH}/"
SIG_UP = f"{SIGNATURE_UPSTREAM}/v2/{REGISTRY_PATH}/"
MIRROR = "MIRROR"  # replaced by the fake mirror's URL
CDN = "CDN"  # replaced by the default mirror's URL
# The server has a signature upstream of its own, so the signature fallback
# is on, and nothing listens at the upstream: every check of content by
# digest there fails, and a failed check sends it to the signature upstream
# (which holds everything). Blobs no mirror serves and manifests by digest
# go there; tags, and blobs the mirror holds, never see the check.


@dataclass(frozen=True)
class Case:
    raw: bytes
    status: int
    location: str | None = None
    head: bool = False


def get(target: str, *headers: str, method: str = "GET") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: registry.test", *headers, "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def blob(target_digest: str = HELD) -> str:
    return f"/v2/pause/blobs/{target_digest}"


def forwarded(value: str) -> str:
    return f"X-Forwarded-For: {value}"


CASES: dict[str, Case] = {
    # -- paths that try to leave the configured prefix or host
    "dot-dot-segment": Case(get(f"/v2/../blobs/{HELD}"), 400),
    "dot-dot-inside-name": Case(get("/v2/pause/../../etc/manifests/latest"), 400),
    "encoded-dot-dot": Case(get("/v2/%2e%2e/%2E%2E/manifests/latest"), 400),
    "single-dot-segment": Case(get("/v2/./pause/manifests/latest"), 400),
    "double-slash-in-name": Case(get("/v2/pause//x/manifests/latest"), 400),
    "leading-double-slash": Case(get("//v2/pause/manifests/latest"), 404),
    "encoded-slash-decoded-as-upstream-does": Case(
        get("/v2/pause%2Fextra/manifests/latest"), 307, UP + "pause/extra/manifests/latest"
    ),
    "encoded-slash-making-empty-segment": Case(get("/v2/pause%2F%2Fx/manifests/latest"), 400),
    "at-sign-before-host-like-name": Case(get("/v2/@evil.example/manifests/latest"), 400),
    # a manifest reference that is neither a tag nor a digest names nothing: 404
    "userinfo-in-tag": Case(get("/v2/pause/manifests/latest@evil.example"), 404),
    "encoded-at-sign": Case(get("/v2/evil.example%40pause/manifests/latest"), 400),
    "backslash-in-name": Case(get("/v2/pause\\..\\x/manifests/latest"), 400),
    "encoded-backslash": Case(get("/v2/pause%5Cevil/manifests/latest"), 400),
    "absolute-url-target": Case(get("http://evil.example/v2/pause/manifests/latest"), 404),
    "scheme-in-name": Case(get("/v2/https://evil.example/manifests/latest"), 400),
    "uppercase-name": Case(get("/v2/Pause/manifests/latest"), 400),
    "name-over-255-characters": Case(get("/v2/" + "a" * 256 + "/manifests/latest"), 400),
    "name-of-255-characters": Case(get("/v2/" + "a" * 255 + "/manifests/latest"), 307,
                                   UP + "a" * 255 + "/manifests/latest"),
    "tag-over-128-characters": Case(get("/v2/pause/manifests/" + "t" * 129), 404),
    "overlong-utf8-slash": Case(get("/v2/pause%c0%afx/manifests/latest"), 400),
    "right-to-left-override": Case(get("/v2/pause%e2%80%ae/manifests/latest"), 400),
    "invalid-utf8-escape": Case(get("/v2/pause%ff/manifests/latest"), 400),
    "bad-percent-escape": Case(get("/v2/pause%zz/manifests/latest"), 400),
    "truncated-percent-escape": Case(get("/v2/pause/manifests/latest%"), 404),
    "encoded-nul": Case(get("/v2/pause%00/manifests/latest"), 400),
    "raw-nul-in-target": Case(get("/v2/pa\x00use/manifests/latest"), 400),
    "raw-tab-in-target": Case(get("/v2/pa\tuse/manifests/latest"), 400),
    "raw-high-bytes-in-path": Case(get("/v2/pa\xe9use/manifests/latest"), 400),
    # -- header injection through anything copied into Location
    "encoded-crlf-in-tag": Case(get("/v2/pause/manifests/latest%0d%0aSet-Cookie:%20a=b"), 404),
    "encoded-crlf-in-query-stays-encoded": Case(
        get("/v2/pause/manifests/latest?x=%0d%0aSet-Cookie:%20a"), 307,
        UP + "pause/manifests/latest?x=%0d%0aSet-Cookie:%20a",
    ),
    "raw-cr-in-target": Case(b"GET /v2/pause/manifests/latest\rX: y HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    # The parser ends the request line at a bare LF: what follows is a header, never part of Location.
    "raw-lf-ends-request-line": Case(b"GET /v2/pause/manifests/latest\nX: y HTTP/1.1\r\nHost: x\r\n\r\n", 307,
                                     UP + "pause/manifests/latest"),
    "raw-high-bytes-in-query": Case(get("/v2/pause/manifests/latest?q=\xff\xfe"), 400),
    "hash-in-query-encoded": Case(get("/v2/pause/manifests/latest?a#b"), 307, UP + "pause/manifests/latest?a%23b"),
    "quote-and-angle-in-query-encoded": Case(
        get('/v2/pause/manifests/latest?a="<b>"'), 307, UP + "pause/manifests/latest?a=%22%3Cb%3E%22"
    ),
    "long-query-kept": Case(get("/v2/pause/manifests/latest?" + "a" * 8000), 307,
                            UP + "pause/manifests/latest?" + "a" * 8000),
    # -- limits
    "request-target-over-limit": Case(get("/v2/pause/manifests/latest?" + "a" * 9000), 414),
    "headers-over-limit": Case(get("/v2/", "X-Big: " + "b" * 20000), 431),
    "many-small-headers-over-limit": Case(get("/v2/", *[f"X-{i}: {'v' * 40}" for i in range(500)]), 431),
    # -- not HTTP, or HTTP we do not speak
    "tls-client-hello": Case(bytes.fromhex("16030100a5010000a10303") + b"\x00" * 40 + b"\r\n\r\n", 400),
    "http2-preface": Case(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    "lowercase-method": Case(get("/v2/", method="get"), 400),
    "unknown-method": Case(get("/v2/", method="BREW"), 400),
    "post": Case(get("/v2/pause/manifests/latest", "Content-Length: 0", method="POST"), 405),
    "delete": Case(get("/v2/pause/manifests/latest", method="DELETE"), 405),
    "options-star": Case(get("*", method="OPTIONS"), 405),
    "http-1.0-get": Case(b"GET /v2/pause/manifests/latest HTTP/1.0\r\n\r\n", 307, UP + "pause/manifests/latest"),
    "no-http-version-answered-as-1.1": Case(b"GET /v2/\r\n\r\n", 200),
    "http-version-9": Case(b"GET /v2/ HTTP/9.9\r\nHost: x\r\n\r\n", 400),
    "bare-lf-line-endings": Case(b"GET /v2/ HTTP/1.1\nHost: x\nConnection: close\n\n", 400),
    "header-without-colon": Case(b"GET /v2/ HTTP/1.1\r\nHost x\r\n\r\n", 400),
    "obsolete-header-folding": Case(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n continued\r\n\r\n", 400),
    "content-length-and-chunked": Case(
        get("/v2/", "Content-Length: 4", "Transfer-Encoding: chunked") + b"0\r\n\r\n", 400
    ),
    "two-different-content-lengths": Case(get("/v2/", "Content-Length: 1", "Content-Length: 2") + b"xx", 400),
    "negative-content-length": Case(get("/v2/", "Content-Length: -1"), 400),
    "upgrade-h2c-answered-as-http-1.1": Case(
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n", 200,
    ),
    "catalog": Case(get("/v2/_catalog"), 404),
    "root-to-info": Case(get("/"), 307, INFO_URL),
    "privacy": Case(get("/privacy"), 307, PRIVACY_URL),
    "v2-root-head": Case(get("/v2/", method="HEAD"), 200, head=True),
    # -- X-Forwarded-For
    "xff-missing-uses-peer": Case(get(blob()), 307, CDN + HELD),
    "xff-single-entry-refused": Case(get(blob(), forwarded(AWS_EU_WEST_3)), 400),
    "xff-empty-value-uses-peer": Case(get(blob(), "X-Forwarded-For: "), 307, CDN + HELD),
    "xff-only-commas-and-spaces-uses-peer": Case(get(blob(), forwarded(" , ,, ")), 307, CDN + HELD),
    "xff-garbage-client": Case(get(blob(), forwarded(f"not-an-ip, {LOAD_BALANCER}")), 400),
    "xff-garbage-load-balancer-ignored": Case(get(blob(), forwarded(f"{AWS_EU_WEST_3}, garbage")), 307, MIRROR + HELD),
    "xff-aws-client": Case(get(blob(), forwarded(xff(AWS_EU_WEST_3))), 307, MIRROR + HELD),
    "xff-aws-client-blob-missing": Case(get(blob(MISSING), forwarded(xff(AWS_EU_WEST_3))), 307,
                                        SIG_UP + "pause/blobs/" + MISSING),
    "xff-forged-first-entry-ignored": Case(
        get(blob(), forwarded(f"{GOOGLE_CLOUD}, {AWS_EU_WEST_3}, {LOAD_BALANCER}")), 307, MIRROR + HELD
    ),
    "xff-many-entries": Case(get(blob(), forwarded(", ".join(["10.0.0.1"] * 200 + [xff(AWS_EU_WEST_3)]))), 307,
                             MIRROR + HELD),
    "xff-google-cloud-client-no-mirror": Case(get(blob(), forwarded(xff(GOOGLE_CLOUD))), 307,
                                              SIG_UP + "pause/blobs/" + HELD),
    "xff-nobody-default-mirror": Case(get(blob(), forwarded(xff(NOBODY))), 307, CDN + HELD),
    "xff-ipv4-mapped-ipv6": Case(get(blob(), forwarded(xff("::ffff:" + AWS_EU_WEST_3))), 307, MIRROR + HELD),
    "xff-ipv6-zone-id": Case(get(blob(), forwarded(xff("fe80::1%eth0"))), 307, CDN + HELD),
    "xff-ipv4-with-port": Case(get(blob(), forwarded(xff(AWS_EU_WEST_3 + ":4431"))), 307, MIRROR + HELD),
    "xff-bracketed-ipv6-with-port": Case(get(blob(), forwarded(xff("[::ffff:35.180.1.1]:443"))), 307, MIRROR + HELD),
    "xff-space-separated": Case(get(blob(), forwarded(f"{AWS_EU_WEST_3} {LOAD_BALANCER}")), 307, MIRROR + HELD),
    "xff-cidr-refused": Case(get(blob(), forwarded(xff("35.180.1.1/8"))), 400),
    "xff-non-ascii-refused": Case(get(blob(), forwarded(xff("\xff\xfe"))), 400),
    # Only space and tab separate entries: a no-break space is part of one.
    "xff-no-break-space-is-not-a-separator": Case(
        get(blob(), forwarded(f"{AWS_EU_WEST_3}, \xa0, {LOAD_BALANCER}")), 400
    ),
    "xff-split-over-two-headers": Case(
        get(blob(), forwarded(AWS_EU_WEST_3), forwarded(LOAD_BALANCER)), 307, MIRROR + HELD
    ),
    "xff-ignored-for-manifests": Case(get("/v2/pause/manifests/latest", forwarded("garbage")), 307,
                                      UP + "pause/manifests/latest"),
    # -- digests and signature tags
    "digest-uppercase-hex-refused": Case(get(blob("sha256:" + "AB" * 32), forwarded(xff(AWS_EU_WEST_3))), 400),
    "digest-unknown-algorithm-upstream": Case(get(blob("md5:abc"), forwarded(xff(AWS_EU_WEST_3))), 307,
                                              UP + "pause/blobs/md5:abc"),
    "digest-short-hex-refused": Case(get(blob("sha256:abc"), forwarded(xff(AWS_EU_WEST_3))), 400),
    "manifest-digest-short-hex-refused": Case(get("/v2/pause/manifests/sha256:totallywrong"), 400),
    "digest-without-algorithm": Case(get(blob("abc")), 400),
    "digest-with-slash-encoded": Case(get("/v2/pause/blobs/sha256:ab%2Fcd"), 400),
    "signature-tag-to-signature-upstream": Case(get(f"/v2/pause/manifests/{SIG_TAG}"), 307,
                                                SIG_UP + f"pause/manifests/{SIG_TAG}"),
    "manifest-digest-query-kept-on-fallback": Case(get(f"/v2/pause/manifests/{HELD}?x=%zz&y=\"<b>\""), 307,
                                                   SIG_UP + f"pause/manifests/{HELD}?x=%25zz&y=%22%3Cb%3E%22"),
    "manifest-digest-under-the-path-on-fallback": Case(get(f"/v2/{REGISTRY_PATH}/pause/manifests/{HELD}"), 307,
                                                       SIG_UP + f"pause/manifests/{HELD}"),
    "referrers-to-signature-upstream": Case(get(f"/v2/pause/referrers/{HELD}?artifactType=x%2Fy"), 307,
                                            SIG_UP + f"pause/referrers/{HELD}?artifactType=x%2Fy"),
}


@pytest.fixture(scope="module")
def served(engine: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Settings, str]]:
    with served_process(Path(tmp_path_factory.mktemp("cases")), SIGNATURE_UPSTREAM_ENDPOINT=SIGNATURE_UPSTREAM) as (
            server, configured, mirror):
        mirror.present.add(HELD)
        yield server, configured, mirror.url


@pytest.mark.parametrize("case", [pytest.param(case, id=name) for name, case in CASES.items()])
def test_nasty_request(served: tuple[ServerProcess, Settings, str], case: Case) -> None:
    server, configured, mirror_url = served
    response = exchange(server.port, case.raw, head=case.head)
    assert response.status == engines.refusal(case.status), response
    location = response.header("Location")
    if case.location is None:
        assert location is None
        return
    expected = case.location.replace(MIRROR, mirror_url + "/containers/images/").replace(
        CDN, mirror_url.replace("/bucket", "/cdn") + "/containers/images/"
    )
    assert location == expected
    assert location_problem(location, configured) is None
