"""The request flow of the public port: from a parsed request to a decision.

`RequestFlow.respond` runs the whole flow of docs/request-handling.md for
one request and returns what to answer, as data:

- a `LocalAnswer` (status, body, headers) that we give ourselves;
- a `Decision`, which is always a 307 to `decision.location`;
- a `PendingCheck` when a blob's answer needs an existence HEAD first; the
  engine then awaits `respond_after_check(pending)` for the decision.

No HTTP bytes are made here: reason phrases, the Date header, keep-alive
and `Connection` lines belong to the engines (archeio/http/), which render
and cache them as they see fit. Keeping the synchronous path free of
coroutines is what makes the hot path cheap: a blob whose existence is
cached, and every manifest, is decided without creating a task.

Everything here is per process: the range index (swapped whole on reload),
the router, the existence cache, and plain counters that the metrics
exporter reads.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from typing import NamedTuple

from iprange import CloudIndex, InvalidAddress, Placement

from .clientip import client_ip, strip_port
from .config import Settings
from .existence import BlobExistenceCache
from .routing import (
    BLOB,
    CLIENT_IP_INVALID,
    LOCAL,
    Decision,
    LocalAnswer,
    Route,
    Router,
)

log = logging.getLogger("archeio")
access_log = logging.getLogger("archeio.access")

# The route kind of answers the HTTP layer gives before any routing (a
# malformed request, a request line or headers over their limits): the
# `kind` label of their metrics.
HTTP = "http"

# What an access log line needs beyond the decision: (start time, X-Forwarded-For,
# peer address, X-Cloud-Trace-Context); only built for sampled requests.
AccessContext = tuple[float, str | None, str | None, bytes | None]


class PendingCheck(NamedTuple):
    """A blob request whose answer waits for an existence check of `mirror`."""

    method: str
    path: str
    query: str
    route: Route
    placement: Placement | None
    mirror: str
    request: AccessContext | None


# What `respond` returns: an answer of our own, a redirect, or a check to await.
Outcome = LocalAnswer | Decision | PendingCheck


class RequestFlow:
    """Per-process state and request flow of the public port."""

    def __init__(self, settings: Settings, index: CloudIndex, cache: BlobExistenceCache) -> None:
        self.settings = settings
        self.index = index
        self.index_loaded_at = time.time()
        self.router = Router(settings)
        self.cache = cache
        self._trusted_hops = settings.trusted_hops
        self._use_forwarded = settings.use_forwarded
        self._access_sample = settings.access_log
        # (route kind, decision backend, status) -> count; read by metrics.
        self.requests: Counter[tuple[str, str, int]] = Counter()
        # (cloud, region or "", backend) -> count of blob decisions.
        self.blob_decisions: Counter[tuple[str, str, str]] = Counter()

    def swap_index(self, index: CloudIndex) -> None:
        """Replace the range index whole: requests see the old or the new one."""
        self.index = index
        self.index_loaded_at = time.time()

    def refused(self, status: int) -> None:
        """Count an answer the HTTP layer gave before routing (400, 414, 431, 503)."""
        self.requests[(HTTP, LOCAL, status)] += 1

    # -- metrics ------------------------------------------------------------

    def request_rows(self) -> list[list[object]]:
        return [[k, b, s, n] for (k, b, s), n in self.requests.items()]

    def blob_rows(self) -> list[list[object]]:
        return [[c, r, b, n] for (c, r, b), n in self.blob_decisions.items()]

    # -- the flow -------------------------------------------------------------

    def respond(
        self, method: str, path: str, query: str, forwarded: str | None, peer: str | None,
        trace: bytes | None = None,
    ) -> Outcome:
        """The decision for one request; a `PendingCheck` when a HEAD is needed.

        `path` and `query` are the raw request target split at the first
        '?', bytes as latin-1 characters; `forwarded` is every
        X-Forwarded-For line joined in order with commas.
        """
        request = (time.perf_counter(), forwarded, peer, trace) if self._access_sample else None
        route = self.router.classify(method, path)
        if type(route) is LocalAnswer:
            self.requests[("other", LOCAL, route.status)] += 1
            if request is not None:
                self._log(method, path, query, route.status, "other", LOCAL, None, None, request)
            return route
        assert isinstance(route, Route)
        if route.kind != BLOB or route.digest is None:
            decision = self.router.upstream_location(route, query)
            return self._redirect(method, path, query, route, decision, None, request)

        address = client_ip(forwarded, peer, self._trusted_hops) if self._use_forwarded else peer
        placement = self._placement(address) if address else False
        if placement is False:
            self.requests[(BLOB, LOCAL, 400)] += 1
            if request is not None:
                self._log(method, path, query, 400, BLOB, LOCAL, None, None, request)
            return CLIENT_IP_INVALID
        assert placement is not True
        mirror = self.router.mirror_for(placement)
        if mirror is None:
            found: bool | None = False
        else:
            found = self.cache.cached(mirror, route.digest)
            if found is None:
                return PendingCheck(method, path, query, route, placement, mirror, request)
        decision = self.router.decide(route, query, placement, found)
        return self._redirect(method, path, query, route, decision, placement, request)

    async def respond_after_check(self, pending: PendingCheck) -> Decision:
        """The blob's decision once the mirror has been asked."""
        route = pending.route
        assert route.digest is not None
        found = await self.cache.check(pending.mirror, route.digest)
        decision = self.router.decide(route, pending.query, pending.placement, found)
        return self._redirect(
            pending.method, pending.path, pending.query, route, decision, pending.placement, pending.request
        )

    def _placement(self, address: str) -> Placement | None | bool:
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

    def _redirect(
        self, method: str, path: str, query: str, route: Route, decision: Decision,
        placement: Placement | None, request: AccessContext | None,
    ) -> Decision:
        self.requests[(route.kind, decision.backend, 307)] += 1
        if route.kind == BLOB:
            if placement is None:
                self.blob_decisions[("", "", decision.backend)] += 1
            else:
                self.blob_decisions[(placement.cloud, placement.region, decision.backend)] += 1
        if request is not None:
            self._log(method, path, query, 307, route.kind, decision.backend, placement, decision.location,
                      request)
        return decision

    def _log(
        self, method: str, path: str, query: str, status: int, kind: str, backend: str,
        placement: Placement | None, location: str | None, request: AccessContext,
    ) -> None:
        """One access log line as Google Cloud Logging reads it, for a sampled share."""
        if random.random() >= self._access_sample:
            return
        started, forwarded, peer, trace = request
        url = path + ("?" + query if query else "")
        remote = client_ip(forwarded, peer, self._trusted_hops) if self._use_forwarded else peer
        fields: dict[str, object] = {
            "httpRequest": {
                "requestMethod": method, "requestUrl": url, "status": status,
                "remoteIp": remote or peer, "latency": f"{time.perf_counter() - started:.6f}s",
            },
            "kind": kind,
            "backend": backend,
            "cloud": placement.cloud if placement else None,
            "region": placement.region if placement else None,
            "location": location,
        }
        if trace:
            # X-Cloud-Trace-Context: TRACE_ID/SPAN_ID;o=OPTIONS
            trace_id = trace.split(b"/", 1)[0].decode("latin-1")
            fields["trace"] = trace_id
            if self.settings.trace_project:
                fields["logging.googleapis.com/trace"] = (
                    f"projects/{self.settings.trace_project}/traces/{trace_id}"
                )
        access_log.info("%s %s %s", method, url, status, extra={"fields": fields})
