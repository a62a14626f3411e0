"""The request flow of the public port: from a parsed request to a decision.

`RequestFlow.respond` runs the whole flow of docs/request-handling.md for
one request and returns what to answer, as data:

- a `LocalAnswer` (status, body, headers) that we give ourselves;
- a `Decision`, which is always a 307 to `decision.location`;
- a `PendingCheck` when a blob's answer needs an existence HEAD first; the
  engine then awaits `respond_after_check(pending)` for the decision.

With the signature fallback on (SIGNATURE_UPSTREAM_ENDPOINT set to another
registry than the upstream), `make_flow` gives a `FallbackFlow` instead:
content by digest that no mirror serves (a manifest by digest, a Google
Cloud client's blob, a blob the client's mirror lacks) is checked in the
regional upstream, and what it lacks is sent to the signature upstream.
The choice is made once, at start-up, so that without the setting no
request pays for it.

This is the one decision path: the engines serve with it and `archeio
explain` explains with it (explain.py), so the two cannot disagree.

Answers are counted once they are handed to the transport, never before,
and with their latency (metrics.py, `RequestLatency`): the flow names the
list an answer's latency goes to (`last_answer`, set by `respond`, by
`delivered(pending, decision)` for a checked blob's answer and by
`refused`), and the engine appends to it once the answer is written. On
the hot path that replaces a count with an append, so the latency
histogram costs the engines little more than two clock readings a read.

No HTTP bytes are made here: reason phrases, the Date header, keep-alive
and `Connection` lines belong to the engines (archeio/http/), which render
and cache them as they see fit. Keeping the synchronous path free of
coroutines is what makes the hot path cheap: a blob whose existence is
cached, and every manifest, is decided without creating a task.

With `ARCHEIO_RATE_LIMIT` set, `respond` is bound at start-up to one that
first takes a token from the client's bucket (ratelimit.py) and answers 429
when there is none; unset, nothing of it is on the path.

Everything here is per process: the range index (swapped whole on reload),
the router, the existence cache, the rate limit's buckets, and plain
counters that the metrics exporter reads. A sampled access line is left
in `sampled` for the engine, which completes it with the bytes it sent
and writes it.
"""

from __future__ import annotations

import time
from typing import Any, Literal, NamedTuple

from iprange import CloudIndex, InvalidAddress, Placement

from .clientip import client_ip, strip_port
from .config import Settings
from .existence import BlobExistenceCache
from .logs import AccessLine, RequestFacts
from .metrics import RequestLatency
from .ratelimit import MAX_KEY_LENGTH, RateLimiter, retry_after, too_many_requests
from .routing import (
    BLOB,
    CLIENT_IP_INVALID,
    LOCAL,
    MANIFEST,
    MIRROR,
    OTHER,
    SIGNATURE_FALLBACK,
    Decision,
    DigestRoute,
    LocalAnswer,
    Route,
    Router,
)

# The route kind of answers the HTTP layer gives before any routing (a
# malformed request, a request line or headers over their limits): the
# `kind` label of their metrics.
HTTP = "http"
# The route kind of a 429 for a client over ARCHEIO_RATE_LIMIT: refused
# before it is routed, whatever it asked for.
RATE_LIMITED = "rate_limited"
# Retry-After values whose 429 is kept made (a wait is at most one
# interval of the rate, so at most 1 + 1 / rate values ever occur).
_TOO_MANY_KEPT = 64

_BLOB_TO_MIRROR = (BLOB, MIRROR, 307)
# Distinct X-Forwarded-For values whose placement is remembered, and the
# longest value remembered: Google's load balancer sends `<client>, <lb>`
# (at most about 80 characters), so a real client's value fits with room
# for a few more proxies, and the table holds at most about 1.5 MB whatever
# clients send (4,096 values of at most 256 bytes, with a dict slot and a
# bytes object's overhead each).
CLIENTS_REMEMBERED = 4096
FORWARDED_REMEMBERED_LENGTH = 256
_UNSEEN: Any = object()


# What an access line needs beyond the decision: (X-Forwarded-For, peer
# address, the engine's facts); only built for a request sampled for the log.
AccessContext = tuple["Forwarded", str | None, RequestFacts | None]

# X-Forwarded-For, joined: text, or the raw header bytes (latin-1).
Forwarded = str | bytes | None


class PendingCheck(NamedTuple):
    """A request whose answer waits for an existence check.

    `mirror` is the mirror asked whether it holds the blob. With the
    signature fallback (`FallbackFlow`), the regional upstream is asked next
    when the mirror lacks it, or first and alone when `mirror` is None (a
    manifest by digest, a Google Cloud client's blob).
    """

    method: str
    path: str
    query: str
    route: Route
    placement: Placement | None
    mirror: str | None
    request: AccessContext | None


# What `respond` returns: an answer of our own, a redirect, or a check to await.
Outcome = LocalAnswer | Decision | PendingCheck


class RequestFlow:
    """Per-process state and request flow of the public port."""

    # Whether content by digest is also checked in the regional upstream (FallbackFlow).
    checks_upstream = False

    def __init__(self, settings: Settings, index: CloudIndex, cache: BlobExistenceCache) -> None:
        self.settings = settings
        self.index = index
        self.index_loaded_at = time.time()
        # Answers and their latencies by (route kind, decision backend, status);
        # each route carries its key's list (`route.answers`).
        self.latency = RequestLatency()
        self.router = Router(settings, self.latency.answers, fallback=self.checks_upstream)
        self.cache = cache
        self._trusted_hops = settings.trusted_hops
        self._use_forwarded = settings.use_forwarded
        self._to_mirror_answers = self.latency.answers(_BLOB_TO_MIRROR)
        # The list the answer decided last appends its latency to, once the
        # engine has handed it over (which counts it). An engine that has
        # taken it sets it to `latency.discard`.
        self.last_answer: list[float] = self.latency.discard
        # A sampled access line, left for the engine to complete and write.
        self.sampled: AccessLine | None = None
        # placement (None: in no range) -> backend -> count of blob decisions.
        self._blob_counts: dict[Placement | None, dict[str, int]] = {}
        # Bound methods of the hot path, looked up once.
        # X-Forwarded-For value -> the client's placement (False: unusable).
        self._clients: dict[str | bytes, Placement | None | Literal[False]] = {}
        self._classify = self.router.classify
        self._mirror_for = self.router.mirror_for
        self._mirror_decision = self.router.mirror_decision
        self._cached = cache.cached
        # The limit is chosen here, once: with it on, `respond` is the
        # limited one (an instance attribute, found before the method), so
        # with it off the hot path has not even a test of it.
        self.limiter: RateLimiter | None = None
        if settings.rate_limit:
            self.limiter = RateLimiter(settings.rate_limit, settings.rate_burst, settings.rate_clients)
            self._wait = self.limiter.wait
            self._respond = self.respond
            self._too_many: dict[int, LocalAnswer] = {}
            # X-Forwarded-For value -> the client address it names, remembered
            # as placements are (the same bounds).
            self._keys: dict[str | bytes, str] = {}
            self.respond = self._limited  # type: ignore[method-assign]

    def swap_index(self, index: CloudIndex) -> None:
        """Replace the range index whole: requests see the old or the new one."""
        self.index = index
        self.index_loaded_at = time.time()
        self._clients = {}  # placements under the old index

    def refused(self, status: int) -> None:
        """Count an answer the HTTP layer gave before routing (400, 414, 431, 503)."""
        self._count((HTTP, LOCAL, status))

    def _count(self, key: tuple[str, str, int]) -> None:
        """The answer decided now has this key: it is counted when the engine appends its latency."""
        self.last_answer = self.latency.answers(key)

    # -- metrics ------------------------------------------------------------

    @property
    def requests(self) -> dict[tuple[str, str, int], int]:
        """Answers handed over so far, by (route kind, decision backend, status)."""
        return self.latency.counts()

    def request_rows(self) -> list[list[object]]:
        return [[k, b, s, n] for (k, b, s), n in self.requests.items()]

    def blob_rows(self) -> list[list[object]]:
        return [
            [placement.cloud if placement else "", placement.region if placement else "", backend, n]
            for placement, counts in self._blob_counts.items() for backend, n in counts.items()
        ]

    # -- the flow -------------------------------------------------------------

    def respond(
        self, method: str, path: str, query: str, forwarded: Forwarded, peer: str | None,
        facts: RequestFacts | None = None,
    ) -> Outcome:
        """The decision for one request; a `PendingCheck` when a HEAD is needed.

        `path` and `query` are the raw request target split at the first
        '?', bytes as latin-1 characters; `forwarded` is every
        X-Forwarded-For line joined in order with commas, as text or as the
        raw header bytes (read as latin-1 only if needed: most requests are
        not blobs, and most blobs come from a client seen before). `facts`
        is what only an access line reads, given by the engine for the
        requests it samples for the access log (ARCHEIO_ACCESS_LOG).
        """
        route = self._classify(method, path)
        if type(route) is not Route:  # an answer of our own (or FallbackFlow's DigestRoute: see there)
            return self._local(route, method, path, query, forwarded, peer, facts)  # type: ignore[arg-type]
        digest = route.digest
        if digest is None:  # anything but a blob we could find in a mirror
            decision = route.plain if not query else self.router.upstream_location(route, query)
            self.last_answer = route.answers  # self._count(route.counted), inline on the hot path
            if facts is not None:
                self._log(method, path, query, 307, route.kind, decision.backend, None, decision.location,
                          (forwarded, peer, facts))
            return decision

        if forwarded and self._use_forwarded:
            placement = self._clients.get(forwarded, _UNSEEN)
            if placement is _UNSEEN:
                placement = self._client_placement(forwarded, peer)
        else:
            placement = self._placement(peer) if peer else False
        if placement is False:  # no usable client address
            return self._local(CLIENT_IP_INVALID, method, path, query, forwarded, peer, facts, BLOB)
        mirror = self._mirror_for(placement)
        if mirror is not None:
            found = self._cached(mirror, digest)
            if found is None:
                request = (forwarded, peer, facts) if facts is not None else None
                return PendingCheck(method, path, query, route, placement, mirror, request)
            if found:
                return self._to_mirror(method, path, query, route, mirror, placement, forwarded, peer, facts)
        return self._to_upstream(method, path, query, route, placement, forwarded, peer, facts)

    def _limited(
        self, method: str, path: str, query: str, forwarded: Forwarded, peer: str | None,
        facts: RequestFacts | None = None,
    ) -> Outcome:
        """`respond` under ARCHEIO_RATE_LIMIT: a token from the client's bucket, else a 429."""
        if forwarded and self._use_forwarded:
            key = self._keys.get(forwarded)
            if key is None:
                key = self._client_key(forwarded, peer)
        else:
            key = peer or ""
        wait = self._wait(key)
        if wait:
            seconds = retry_after(wait)
            answer = self._too_many.get(seconds)
            if answer is None:
                answer = too_many_requests(seconds)
                if len(self._too_many) < _TOO_MANY_KEPT:
                    self._too_many[seconds] = answer
            return self._local(answer, method, path, query, forwarded, peer, facts, RATE_LIMITED)
        return self._respond(method, path, query, forwarded, peer, facts)

    def _client_key(self, forwarded: str | bytes, peer: str | None) -> str:
        """The address an X-Forwarded-For value makes the client, for the limit: without a port.

        The one blobs are routed by. With no usable address in the header
        (too few entries for the trusted hops, or an entry too long to be an
        address) the request did not come the way the header says: its
        sender, the peer, is counted. A key taken from the header alone is
        remembered for the value, as `_client_placement` remembers
        placements.
        """
        text = forwarded.decode("latin-1") if type(forwarded) is bytes else forwarded
        address = client_ip(text, peer, self._trusted_hops)  # type: ignore[arg-type]
        if not address or address is peer or len(address) > MAX_KEY_LENGTH:
            return peer or ""
        key = strip_port(address)
        if len(forwarded) <= FORWARDED_REMEMBERED_LENGTH:
            if len(self._keys) >= CLIENTS_REMEMBERED:
                self._keys.clear()
            self._keys[forwarded] = key
        return key

    async def respond_after_check(self, pending: PendingCheck) -> Decision:
        """The blob's decision once the mirror has been asked (not counted yet: `delivered`)."""
        assert pending.route.digest is not None and pending.mirror is not None
        return self.decide_checked(pending, await self.cache.check(pending.mirror, pending.route.digest))

    def decide_checked(self, pending: PendingCheck, found: bool, at_upstream: bool = True) -> Decision:
        """The decision when the mirror holds the blob (`found`) or not.

        `at_upstream`, whether the regional upstream holds it, matters only
        with the signature fallback (`FallbackFlow`); without it, the
        upstream is where everything is.
        """
        if found and pending.mirror is not None:
            return self.router.mirror_decision(pending.route, pending.mirror)
        return pending.route.plain if not pending.query else self.router.upstream_location(pending.route,
                                                                                           pending.query)

    def delivered(self, pending: PendingCheck, decision: Decision) -> None:
        """A checked answer is being handed to the transport: count it, make its access line if sampled."""
        route = pending.route
        backend = decision.backend
        if backend == MIRROR:
            self.last_answer = self._to_mirror_answers
        elif backend == route.backend:
            self.last_answer = route.answers
        else:
            self._count((route.kind, backend, 307))
        if route.kind == BLOB:
            self._count_blob(pending.placement, backend)
        if pending.request is not None:
            self._log(pending.method, pending.path, pending.query, 307, route.kind, backend, pending.placement,
                      decision.location, pending.request)

    def _to_mirror(
        self, method: str, path: str, query: str, route: Route, mirror: str, placement: Placement | None,
        forwarded: Forwarded, peer: str | None, facts: RequestFacts | None,
    ) -> Decision:
        decision = self._mirror_decision(route, mirror)
        # self._count(_BLOB_TO_MIRROR) and _count_blob(placement, MIRROR), inline on the hot path
        self.last_answer = self._to_mirror_answers
        counts = self._blob_counts.get(placement)
        try:
            counts[MIRROR] += 1  # type: ignore[index]
        except (KeyError, TypeError):
            self._count_blob(placement, MIRROR)
        if facts is not None:
            self._log(method, path, query, 307, BLOB, MIRROR, placement, decision.location, (forwarded, peer, facts))
        return decision

    def _to_upstream(
        self, method: str, path: str, query: str, route: Route, placement: Placement | None,
        forwarded: Forwarded, peer: str | None, facts: RequestFacts | None,
    ) -> Decision:
        decision = route.plain if not query else self.router.upstream_location(route, query)
        self.last_answer = route.answers
        self._count_blob(placement, decision.backend)
        if facts is not None:
            self._log(method, path, query, 307, BLOB, decision.backend, placement, decision.location,
                      (forwarded, peer, facts))
        return decision

    def _local(
        self, answer: LocalAnswer, method: str, path: str, query: str, forwarded: Forwarded,
        peer: str | None, facts: RequestFacts | None, kind: str = OTHER,
    ) -> Outcome:
        self._count((kind, LOCAL, answer.status))
        if facts is not None:
            self._log(method, path, query, answer.status, kind, LOCAL, None, None, (forwarded, peer, facts))
        return answer

    def _count_blob(self, placement: Placement | None, backend: str) -> None:
        counts = self._blob_counts.get(placement)
        if counts is None:
            counts = self._blob_counts[placement] = {}
        try:
            counts[backend] += 1
        except KeyError:
            counts[backend] = 1

    def _client_placement(self, forwarded: str | bytes, peer: str | None) -> Placement | None | Literal[False]:
        """The placement of the client a header names, remembered for the next request with it.

        A pull is a burst of requests from one client behind one load
        balancer, so the same header value comes back many times: its
        placement is remembered (at most `CLIENTS_REMEMBERED` values of at
        most `FORWARDED_REMEMBERED_LENGTH` bytes, the table emptied when
        full, and when the range index changes).
        """
        text = forwarded.decode("latin-1") if type(forwarded) is bytes else forwarded
        address = client_ip(text, peer, self._trusted_hops)  # type: ignore[arg-type]
        placement = self._placement(address) if address else False
        # Taken from the header, not the peer, the header alone decides; a
        # long value is not remembered (the table's bytes stay bounded).
        if address is not peer and len(forwarded) <= FORWARDED_REMEMBERED_LENGTH:
            if len(self._clients) >= CLIENTS_REMEMBERED:
                self._clients.clear()
            self._clients[forwarded] = placement
        return placement

    def _placement(self, address: str) -> Placement | None | Literal[False]:
        """The client's placement; False if the address is not an address."""
        try:
            return self.index.lookup(address)
        except InvalidAddress:
            pass
        # Slow path: some proxies write a port or brackets into the header.
        bare = strip_port(address)
        if bare != address:
            try:
                return self.index.lookup(bare)
            except InvalidAddress:
                pass
        return False

    def _log(
        self, method: str, path: str, query: str, status: int, kind: str, backend: str,
        placement: Placement | None, location: str | None, request: AccessContext,
    ) -> None:
        """The access line of a request the engine sampled (it gave `facts`), left in `sampled` for the engine."""
        forwarded, peer, facts = request
        if isinstance(forwarded, bytes):
            forwarded = forwarded.decode("latin-1")
        url = path + ("?" + query if query else "")
        remote = client_ip(forwarded, peer, self._trusted_hops) if self._use_forwarded else peer
        self.sampled = AccessLine(method, url, status, remote or peer, facts, {
            "kind": kind,
            "backend": backend,
            "cloud": placement.cloud if placement else None,
            "region": placement.region if placement else None,
            "location": location,
        }, self.settings.trace_project)


class FallbackFlow(RequestFlow):
    """The request flow with the signature fallback (kubernetes/registry.k8s.io PR #337's proposal).

    Signatures and attestations are pushed only to the signature upstream;
    clients then fetch their manifests and blobs by digest, which go to the
    regional upstream like all content by digest. So content by digest that
    no mirror serves is checked there first (`BlobExistenceCache.check_registry`,
    with the mirrors' coalescing, concurrency limit and a breaker of its own):
    present, the answer is the usual one; absent, or the check failed, the
    same path on the signature upstream, which holds everything.

    What this class changes, against `RequestFlow`, is where a checkable
    digest goes when it would go to the upstream: `_to_upstream` (a blob
    whose mirror lacks it, or a Google Cloud client's blob) and `_local`,
    where `respond` sends a `DigestRoute` (a manifest by digest). A blob the
    mirror holds, a manifest by tag and everything else take the same code
    as without the fallback.
    """

    checks_upstream = True

    def __init__(self, settings: Settings, index: CloudIndex, cache: BlobExistenceCache) -> None:
        super().__init__(settings, index, cache)
        self._regional = settings.upstream_registry_endpoint
        # The answer lists of the fallback's redirects, one per kind, taken once.
        self._fallback_answers = {
            kind: self.latency.answers((kind, SIGNATURE_FALLBACK, 307)) for kind in (BLOB, MANIFEST)
        }

    def _local(
        self, answer: LocalAnswer, method: str, path: str, query: str, forwarded: Forwarded,
        peer: str | None, facts: RequestFacts | None, kind: str = OTHER,
    ) -> Outcome:
        if type(answer) is DigestRoute:  # a manifest by digest: its answer never depends on the client
            return self._to_upstream(method, path, query, answer, None, forwarded, peer, facts)
        return super()._local(answer, method, path, query, forwarded, peer, facts, kind)

    def _to_upstream(  # type: ignore[override]
        self, method: str, path: str, query: str, route: Route, placement: Placement | None,
        forwarded: Forwarded, peer: str | None, facts: RequestFacts | None,
    ) -> Decision | PendingCheck:
        """Content by digest no mirror serves: the regional upstream's answer, or a check of it.

        Inline where it can be: every pull fetches its platform manifest by
        digest, so a known "present" is this flow's most common answer.
        """
        found = self._cached(self._regional, route.rest)
        if found:
            decision = route.plain if not query else self.router.upstream_location(route, query)
            self.last_answer = route.answers
        elif found is None:
            request = (forwarded, peer, facts) if facts is not None else None
            return PendingCheck(method, path, query, route, placement, None, request)
        else:
            decision = self.router.fallback_location(route, query)
            self.last_answer = self._fallback_answers[route.kind]
        if route.kind == BLOB:
            self._count_blob(placement, decision.backend)
        if facts is not None:
            self._log(method, path, query, 307, route.kind, decision.backend, placement, decision.location,
                      (forwarded, peer, facts))
        return decision

    async def respond_after_check(self, pending: PendingCheck) -> Decision:
        """The mirror first, if any; when it lacks the blob, the regional upstream (unless known)."""
        route = pending.route
        mirror = pending.mirror
        if mirror is not None:
            assert route.digest is not None
            if await self.cache.check(mirror, route.digest):
                return self.decide_checked(pending, True)
        found = self._cached(self._regional, route.rest)
        if found is None:
            found = await self.cache.check_registry(self._regional, route.rest, route.upstream)
        return self.decide_checked(pending, False, found)

    def decide_checked(self, pending: PendingCheck, found: bool, at_upstream: bool = True) -> Decision:
        """The decision when the mirror holds the blob (`found`), else when the regional upstream
        holds the content (`at_upstream`) or not."""
        if found and pending.mirror is not None:
            return self.router.mirror_decision(pending.route, pending.mirror)
        return self.decide_upstream(pending.route, pending.query, at_upstream)

    def decide_upstream(self, route: Route, query: str, found: bool) -> Decision:
        """The regional upstream's redirect if it holds the content, else the signature upstream's."""
        if found:
            return route.plain if not query else self.router.upstream_location(route, query)
        return self.router.fallback_location(route, query)


def make_flow(settings: Settings, index: CloudIndex, cache: BlobExistenceCache) -> RequestFlow:
    """The request flow for these settings: with the signature fallback or without, chosen once."""
    flow = FallbackFlow if settings.signature_fallback else RequestFlow
    return flow(settings, index, cache)
