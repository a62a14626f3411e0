"""The request flow of the public port: from a parsed request to response bytes.

`Frontend.respond` runs the whole flow of docs/request-handling.md for one
request and returns the bytes to send, or None when the answer needs an
existence check first (then `respond_after_check` is awaited). Keeping the
synchronous path free of coroutines is what makes the hot path cheap: a blob
whose existence is cached, and every manifest, is answered without creating
a task.

Everything here is per process: the range index (swapped whole on reload),
the router, the existence cache, and plain counters that the metrics
exporter reads.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from email.utils import formatdate

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

# What an access log line needs beyond the decision: (start time, X-Forwarded-For,
# peer address, X-Cloud-Trace-Context); only built for sampled requests.
AccessContext = tuple[float, str | None, str | None, bytes | None]

_REASONS = {
    200: b"OK",
    307: b"Temporary Redirect",
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}


def render(status: int, headers: bytes, body: bytes, head: bool, keep_alive: bool, date: bytes) -> bytes:
    """One HTTP/1.1 response. `headers` is preformatted `Name: value\\r\\n` lines."""
    return b"".join((
        b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown")),
        headers,
        b"Content-Length: %d\r\n" % len(body),
        date,
        b"" if keep_alive else b"Connection: close\r\n",
        b"\r\n",
        b"" if head else body,
    ))


def _answer_headers(answer: LocalAnswer) -> bytes:
    lines = b""
    if answer.location is not None:
        lines += b"Location: " + answer.location.encode("ascii") + b"\r\n"
    if answer.content_type is not None:
        lines += b"Content-Type: " + answer.content_type.encode("ascii") + b"\r\n"
    if answer.status == 200:
        # Tells clients this is a registry; they then skip the token dance.
        lines += b"Docker-Distribution-Api-Version: registry/2.0\r\n"
    if answer.status == 405:
        lines += b"Allow: GET, HEAD\r\n"
    return lines


class Frontend:
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
        self._answer_headers: dict[int, bytes] = {}
        # (route kind, decision backend, status) -> count; read by metrics.
        self.requests: Counter[tuple[str, str, int]] = Counter()
        # (cloud, region or "", backend) -> count of blob decisions.
        self.blob_decisions: Counter[tuple[str, str, str]] = Counter()
        self.date = b""
        self.tick()

    def tick(self) -> None:
        """Refresh the cached Date header; the server calls this every second."""
        self.date = b"Date: " + formatdate(usegmt=True).encode() + b"\r\n"

    def swap_index(self, index: CloudIndex) -> None:
        """Replace the range index whole: requests see the old or the new one."""
        self.index = index
        self.index_loaded_at = time.time()

    # -- responses -------------------------------------------------------

    def answer(self, answer: LocalAnswer, head: bool, keep_alive: bool) -> bytes:
        headers = self._answer_headers.get(id(answer))
        if headers is None:
            headers = self._answer_headers[id(answer)] = _answer_headers(answer)
        return render(answer.status, headers, answer.body, head, keep_alive, self.date)

    def redirect(self, location: str, keep_alive: bool) -> bytes:
        return b"".join((
            b"HTTP/1.1 307 Temporary Redirect\r\nLocation: ",
            location.encode("ascii"),
            b"\r\nContent-Length: 0\r\n",
            self.date,
            b"\r\n" if keep_alive else b"Connection: close\r\n\r\n",
        ))

    # -- the flow --------------------------------------------------------

    def respond(
        self, method: str, path: str, query: str, forwarded: str | None, peer: str | None,
        keep_alive: bool, trace: bytes | None = None,
    ) -> bytes | tuple[Route, Placement | None, str]:
        """Response bytes, or (route, placement, mirror) when a HEAD is needed."""
        request = (time.perf_counter(), forwarded, peer, trace) if self._access_sample else None
        route = self.router.classify(method, path)
        if type(route) is LocalAnswer:
            self.requests[("other", LOCAL, route.status)] += 1
            self._log(method, path, query, route.status, "other", LOCAL, None, None, request)
            return self.answer(route, method == "HEAD", keep_alive)
        assert isinstance(route, Route)
        if route.kind != BLOB or route.digest is None:
            decision = self.router.upstream_location(route, query)
            return self._redirect(method, path, query, route, decision, None, keep_alive, request)

        address = client_ip(forwarded, peer, self._trusted_hops) if self._use_forwarded else peer
        placement = self._placement(address) if address else False
        if placement is False:
            self.requests[(BLOB, LOCAL, 400)] += 1
            self._log(method, path, query, 400, BLOB, LOCAL, None, None, request)
            return self.answer(CLIENT_IP_INVALID, method == "HEAD", keep_alive)
        assert placement is not True
        mirror = self.router.mirror_for(placement)
        if mirror is None:
            found: bool | None = False
        else:
            found = self.cache.cached(mirror, route.digest)
            if found is None:
                return route, placement, mirror
        decision = self.router.decide(route, query, placement, found)
        return self._redirect(method, path, query, route, decision, placement, keep_alive, request)

    async def respond_after_check(
        self, method: str, path: str, query: str, route: Route, placement: Placement | None,
        mirror: str, keep_alive: bool, client: tuple[str | None, str | None, bytes | None] | None = None,
    ) -> bytes:
        """The blob answer once the mirror has been asked.

        `client` is (X-Forwarded-For, peer, X-Cloud-Trace-Context), for the access log.
        """
        assert route.digest is not None
        request = (time.perf_counter(), *client) if self._access_sample and client else None
        found = await self.cache.check(mirror, route.digest)
        decision = self.router.decide(route, query, placement, found)
        return self._redirect(method, path, query, route, decision, placement, keep_alive, request)

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
        placement: Placement | None, keep_alive: bool, request: AccessContext | None = None,
    ) -> bytes:
        self.requests[(route.kind, decision.backend, 307)] += 1
        if route.kind == BLOB:
            if placement is None:
                self.blob_decisions[("", "", decision.backend)] += 1
            else:
                self.blob_decisions[(placement.cloud, placement.region, decision.backend)] += 1
        if request is not None:
            self._log(method, path, query, 307, route.kind, decision.backend, placement, decision.location,
                      request)
        return self.redirect(decision.location, keep_alive)

    def _log(
        self, method: str, path: str, query: str, status: int, kind: str, backend: str,
        placement: Placement | None, location: str | None, request: AccessContext | None,
    ) -> None:
        """One access log line as Google Cloud Logging reads it, for a sampled share."""
        if request is None or random.random() >= self._access_sample:
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
