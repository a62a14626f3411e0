"""A per-client request limit: one token bucket per client address, in bounded memory.

For deployments without an edge limit in front (Cloud Armor does it for
Google's load balancer, docs/operations.md): `ARCHEIO_RATE_LIMIT` requests a
second per client, `ARCHEIO_RATE_BURST` at once, per worker process. The
request flow asks `wait(key)` for each request and answers 429 when it is
not 0 (app.py); with the limit off, nothing here exists.

Each bucket is kept as a single float, the time at which it will be full
again (the "theoretical arrival time" of the generic cell rate algorithm,
which is a token bucket written with one number): a request at `now` takes
a token, moving that time `interval` (1 / rate) later, unless the bucket
would then be more than `burst` tokens short of full. A bucket whose time
has passed is full, which is what an absent one means: it can be
forgotten without changing any answer.

Memory is bounded whatever clients send (X-Forwarded-For can name any
number of addresses): at most `max_clients` buckets, each keyed by an
address of at most `MAX_KEY_LENGTH` characters. When the table is full, a
sweep forgets every full bucket; if more than three quarters of the table
is still taken, the buckets nearest to full go too, until a quarter is
free, so a sweep's cost is shared by the quarter of new clients that
follow it, and the clients furthest over their rate are the last
forgotten. A bucket forgotten before it was full is counted (`forgotten`):
that client starts again with a full bucket, so at the bound the limit
errs on the lenient side and never refuses a client it should not.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable
from operator import itemgetter

from .routing import LocalAnswer, oci_error

# The longest client address kept as a key: an IPv6 address in its longest
# text form with brackets and a port is 53 characters. Longer is no
# address; the flow keys such a request by its peer instead.
MAX_KEY_LENGTH = 64


class RateLimiter:
    """Token buckets of `burst` tokens refilled at `rate` a second, one per client key."""

    def __init__(
        self, rate: float, burst: int, max_clients: int, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = 1.0 / rate
        # A request is allowed while the bucket stays at most this far from full.
        self.tolerance = burst * self.interval
        self.max_clients = max_clients
        self.forgotten = 0  # buckets dropped before they were full, to stay within the bound
        self._clock = clock
        self._full_at: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._full_at)

    def wait(self, key: str) -> float:
        """0.0 with a token taken from `key`'s bucket, or the seconds until it holds one."""
        now = self._clock()
        full_at = self._full_at.get(key)
        if full_at is None or full_at < now:
            if full_at is None and len(self._full_at) >= self.max_clients:
                self._make_room(now)
            full_at = now
        after = full_at + self.interval
        if after - now > self.tolerance:
            return after - now - self.tolerance
        self._full_at[key] = after
        return 0.0

    def _make_room(self, now: float) -> None:
        """Forget the full buckets; then the nearest to full, until a quarter of the table is free."""
        table = self._full_at
        for key in [key for key, full_at in table.items() if full_at <= now]:
            del table[key]
        excess = len(table) - self.max_clients * 3 // 4
        if excess > 0:
            for key, _ in heapq.nsmallest(excess, table.items(), key=itemgetter(1)):
                del table[key]
            self.forgotten += excess


def retry_after(wait: float) -> int:
    """The Retry-After value of a wait: whole seconds, rounded up (RFC 9110 10.2.3)."""
    return max(1, math.ceil(wait))


def too_many_requests(seconds: int) -> LocalAnswer:
    """The 429 of a client over its limit: OCI's TOOMANYREQUESTS, and when a token is there again."""
    answer = oci_error(429, "TOOMANYREQUESTS", f"too many requests from this address; retry after {seconds} s")
    return answer._replace(headers=(("Retry-After", str(seconds)),))
