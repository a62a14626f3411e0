"""Does a mirror hold a blob? HEAD checks, their caches, coalescing and breakers.

Upstream caches hits forever in an unbounded map, never caches misses and
waits up to 5 s on a slow bucket. Here:

- hits and misses are cached with their own TTLs in separately bounded
  caches, so a flood of random digests (all misses) cannot evict the hits;
- a failed or timed-out check counts as "not there" and is remembered only
  for the short error TTL;
- concurrent requests for the same unchecked blob share one HEAD;
- at most `head_concurrency` HEADs are in flight: a request beyond that is
  answered "not checked" and goes upstream at once instead of queueing;
- each mirror has a circuit breaker: after `breaker_failures` failed checks
  in a row its blobs go upstream without a HEAD for `breaker_cooldown`
  seconds, then one probe decides whether it is used again.

This module owns the one `aiohttp.ClientSession` of the process. It opens
it at the first HEAD, not at start-up: importing aiohttp's client costs
more than the rest of start-up, and most requests never need it. The server
warms the import in a thread once it listens (`warm_client`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from cachetools import TLRUCache, TTLCache

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger("archeio.existence")

# Outcomes of `BlobExistenceCache.check`, also metric labels.
HIT = "hit"
MISS = "miss"
ERROR = "error"
TIMEOUT = "timeout"
COALESCED = "coalesced"
OVER_CAPACITY = "over_capacity"
BREAKER_OPEN = "breaker_open"

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


class CircuitBreaker:
    """Per-mirror breaker: closed -> open after N failures -> half-open probe."""

    def __init__(self, mirror: str, failures: int, cooldown: float,
                 on_change: Callable[[str, str], None] | None = None) -> None:
        self.mirror = mirror
        self.state = CLOSED
        self._threshold = failures
        self._cooldown = cooldown
        self._failures = 0
        self._opened_at = 0.0
        self._probe_started: float | None = None
        self._on_change = on_change

    def _set(self, state: str) -> None:
        if state != self.state:
            self.state = state
            log.warning("mirror %s circuit breaker %s", self.mirror, state)
            if self._on_change is not None:
                self._on_change(self.mirror, state)

    def allow(self, now: float) -> bool:
        """May a HEAD be sent now? In half-open state, only one probe at a time."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN and now - self._opened_at >= self._cooldown:
            self._set(HALF_OPEN)
        if self.state == HALF_OPEN:
            # One probe at a time; a probe that never reported back (its
            # request was cancelled) is replaced after a cooldown.
            started = self._probe_started
            if started is None or now - started >= self._cooldown:
                self._probe_started = now
                return True
        return False

    def record(self, ok: bool, now: float) -> None:
        """Account one finished check: ok means the mirror answered sensibly."""
        self._probe_started = None
        if ok:
            self._failures = 0
            self._set(CLOSED)
            return
        self._failures += 1
        if self.state == HALF_OPEN or self._failures >= self._threshold:
            self._opened_at = now
            self._set(OPEN)


class BlobExistenceCache:
    """Answers "is `digest` at `<mirror>/containers/images/<digest>`", cheaply."""

    def __init__(
        self,
        *,
        hit_ttl: float,
        miss_ttl: float,
        error_ttl: float,
        size: int,
        head_timeout: float,
        head_concurrency: int,
        breaker_failures: int,
        breaker_cooldown: float,
        on_breaker_change: Callable[[str, str], None] | None = None,
        on_check: Callable[[str, str, float], None] | None = None,
    ) -> None:
        self._hits: TTLCache[tuple[str, str], bool] = TTLCache(size, hit_ttl)
        # Misses and errors share one cache; each entry lives for its own TTL.
        ttls = {MISS: miss_ttl, ERROR: error_ttl}
        self._misses: TLRUCache[tuple[str, str], str] = TLRUCache(
            size, lambda _key, value, now: now + ttls[value]
        )
        self._in_flight: dict[tuple[str, str], asyncio.Future[bool]] = {}
        self._head_timeout = head_timeout
        self._head_concurrency = head_concurrency
        self._breaker_failures = breaker_failures
        self._breaker_cooldown = breaker_cooldown
        self._on_breaker_change = on_breaker_change
        # on_check(mirror, outcome, seconds): metrics hook, called per check.
        self._on_check = on_check
        self.breakers: dict[str, CircuitBreaker] = {}
        self.outcomes: Counter[str] = Counter()
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Ready for checks; the client session opens at the first HEAD."""

    def _open_session(self) -> aiohttp.ClientSession:
        """The shared client session (one per process, pooled)."""
        import aiohttp

        connector = aiohttp.TCPConnector(
            limit=self._head_concurrency, ttl_dns_cache=300, keepalive_timeout=30
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self._head_timeout),
            auto_decompress=False,
            skip_auto_headers=("User-Agent",),
            headers={"User-Agent": "archeio"},
        )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def sizes(self) -> dict[str, int]:
        return {"hits": len(self._hits), "misses": len(self._misses)}

    def breaker(self, mirror: str) -> CircuitBreaker:
        breaker = self.breakers.get(mirror)
        if breaker is None:
            breaker = self.breakers[mirror] = CircuitBreaker(
                mirror, self._breaker_failures, self._breaker_cooldown, self._on_breaker_change
            )
        return breaker

    def cached(self, mirror: str, digest: str) -> bool | None:
        """The answer without any I/O, or None when a check is needed.

        An open breaker answers False: the mirror is not trusted for now,
        not even for blobs it was known to hold.
        """
        key = (mirror, digest)
        breaker = self.breakers.get(mirror)
        if breaker is not None and breaker.state != CLOSED and not breaker.allow(time.monotonic()):
            self.outcomes[BREAKER_OPEN] += 1
            return False
        elif breaker is not None and breaker.state == HALF_OPEN:
            # allow() just granted this request the probe: make it check.
            return None
        if key in self._hits:
            return True
        if key in self._misses:
            return False
        return None

    async def check(self, mirror: str, digest: str) -> bool:
        """Is the blob in the mirror? Uses the caches, shares in-flight HEADs."""
        key = (mirror, digest)
        pending = self._in_flight.get(key)
        if pending is not None:
            self.outcomes[COALESCED] += 1
            if self._on_check is not None:
                self._on_check(mirror, COALESCED, 0.0)
            return await asyncio.shield(pending)
        breaker = self.breakers.get(mirror)
        if breaker is None or breaker.state == CLOSED:
            # Another request's HEAD may have finished since `cached` was
            # asked (this runs in a task started after it): use its answer,
            # so a blob costs one HEAD per TTL however requests interleave.
            if key in self._hits:
                return True
            if key in self._misses:
                return False
        if len(self._in_flight) >= self._head_concurrency:
            self.outcomes[OVER_CAPACITY] += 1
            return False
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._in_flight[key] = future
        try:
            found = await self._head(mirror, digest)
        except BaseException:
            future.set_result(False)
            raise
        finally:
            del self._in_flight[key]
        if not future.done():
            future.set_result(found)
        return found

    async def _head(self, mirror: str, digest: str) -> bool:
        import aiohttp

        session = self._session if self._session is not None else self._open_session()
        key = (mirror, digest)
        url = f"{mirror}/containers/images/{digest}"
        started = time.monotonic()
        try:
            async with session.head(url, allow_redirects=False) as response:
                status = response.status
        except TimeoutError:
            outcome = TIMEOUT
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            log.debug("HEAD %s failed: %r", url, exc)
            outcome = ERROR
        else:
            if status == 200:
                outcome = HIT
            elif status >= 500 or status == 429:
                outcome = ERROR
            else:
                # 404, and 403 from S3 buckets that hide what they lack.
                outcome = MISS
        now = time.monotonic()
        self.breaker(mirror).record(outcome in (HIT, MISS), now)
        self.outcomes[outcome] += 1
        if self._on_check is not None:
            self._on_check(mirror, outcome, now - started)
        if outcome == HIT:
            self._misses.pop(key, None)
            self._hits[key] = True
            return True
        self._misses[key] = MISS if outcome == MISS else ERROR
        return False


def warm_client() -> None:
    """Import aiohttp's client in a thread, so the first HEAD does not wait for it."""
    threading.Thread(target=_import_client, name="archeio-warm-client", daemon=True).start()


def _import_client() -> None:
    import aiohttp  # noqa: F401
