"""Does a mirror hold a blob? HEAD checks, their caches, coalescing and breakers.

Two kinds of check share everything below:

- a blob in a mirror bucket (`check`): `HEAD <mirror>/containers/images/<digest>`,
  remembered by (mirror, digest), since a bucket holds blobs by digest alone;
- content by digest in the regional upstream registry (`check_registry`, the
  signature fallback of app.py): `HEAD <registry>/v2/<path>/<name>/manifests|blobs/<digest>`,
  remembered by (registry, `<name>/manifests|blobs/<digest>`), since in a
  registry content belongs to a repository. The key is the route's own
  string, so an entry costs what a blob entry does plus the repository name.

Upstream caches hits forever in an unbounded map, never caches misses and
waits up to 5 s on a slow bucket. Here:

- hits and misses are cached with their own TTLs in separately bounded
  caches, so a flood of random digests (all misses) cannot evict the hits;
  each cache is an `ExpiringSet`: two generations of plain sets per mirror,
  which forget everything at most one TTL after it was learnt and hold at
  most `size` entries. We replaced cachetools' TTLCache here because it
  measured 436-548 bytes and 560-630 ns a lookup per entry against about
  170 bytes and 110 ns for these sets (docs/performance.md has the
  measurement); what is given up is least-recently-used eviction: under a
  flood a whole generation goes at once, so a popular blob may be HEADed
  once more;
- a failed or timed-out check counts as "not there" and is remembered only
  for the short error TTL;
- a 403 is "not there" like a 404, and counts as a sensible answer for the
  breaker: S3 answers 403 for a missing key when the reader may not list
  the bucket, which a public mirror's policy often allows. It is counted
  apart (`forbidden`), because a bucket policy that denies reads sends
  every answer there: an operator alerts on its share;
- concurrent requests for the same unchecked blob share one HEAD;
- at most `head_concurrency` HEADs are in flight: a request beyond that is
  answered "not checked" and goes upstream at once instead of queueing;
- each mirror, and the regional upstream, has a circuit breaker of its own
  (by base URL): after `breaker_failures` failed checks in a row it is not
  asked (its answer taken as "not there") for `breaker_cooldown` seconds,
  then one probe decides whether it is asked again.

This module owns the one `aiohttp.ClientSession` of the process. It opens
it at the first HEAD, not at start-up: importing aiohttp's client costs
more than the rest of start-up, and most requests never need it. The server
warms the import in a thread once it listens (`warm_client`).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import aiohttp

    from .config import Settings

log = logging.getLogger("archeio.existence")

# Outcomes of `BlobExistenceCache.check`, also metric labels.
HIT = "hit"
MISS = "miss"
FORBIDDEN = "forbidden"
ERROR = "error"
TIMEOUT = "timeout"
COALESCED = "coalesced"
OVER_CAPACITY = "over_capacity"
BREAKER_OPEN = "breaker_open"

# Outcomes of a HEAD the mirror answered sensibly (the breaker's successes),
# and of one that failed (remembered for the short error TTL).
_ANSWERED = frozenset({HIT, MISS, FORBIDDEN})
_FAILED = frozenset({ERROR, TIMEOUT})

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"

# What a registry check accepts: Debian's docker-registry (distribution 2.8)
# answers 404 to a HEAD for an OCI manifest or an index unless the request
# accepts its media type; for blobs, Accept does not matter.
REGISTRY_ACCEPT = ", ".join((
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
))
_REGISTRY_HEADERS = {"Accept": REGISTRY_ACCEPT}


def head_outcome(status: int, registry: bool) -> str:
    """What a HEAD's status says: HIT, MISS, FORBIDDEN or ERROR.

    200 is a hit; a registry may also answer a blob with a redirect to its
    storage, which says it holds it. 5xx and 429 are failures. Anything
    else is "not there": 404, and 403 from buckets that hide what they
    lack, counted apart as FORBIDDEN (a policy denying reads looks the
    same, and an operator alerts on its share). From a registry, 401 and
    403 count as "not there" too: the client we would send there gets the
    same refusal, and the signature upstream, where a miss goes, holds
    everything.
    """
    if status == 200 or (registry and 300 <= status < 400):
        return HIT
    if status >= 500 or status == 429:
        return ERROR
    if status == 403:
        return FORBIDDEN
    return MISS


class CircuitBreaker:
    """Per-mirror (per base URL) breaker: closed -> open after N failures -> half-open probe."""

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


class ExpiringSet:
    """(mirror, key) pairs remembered for at most `ttl` seconds, at most `capacity` at a time.

    The key is a blob's digest for a mirror bucket, the route's
    `<name>/manifests|blobs/<digest>` for the regional upstream registry.

    Two generations of sets per mirror: new pairs go into the young one;
    every ttl/2 seconds, or when the young one holds half of `capacity`,
    the old generation is dropped and the young one becomes old. The old
    generation is consulted only until one ttl after its pairs began to be
    learnt, so no answer outlives its TTL, whenever the rotation happens.
    A pair costs a slot in a set (the key string is usually shared with
    the router's route); a lookup is two or three set lookups.
    """

    __slots__ = ("ttl", "capacity", "_half", "_young", "_old", "_young_count", "_old_count", "_young_since",
                 "_rotate_at", "_old_until")

    def __init__(self, ttl: float, capacity: int, now: float = 0.0) -> None:
        self.ttl = ttl
        self.capacity = capacity
        # Each generation holds at most half: both together at most `capacity`.
        self._half = max(1, capacity // 2)
        self._young: dict[str, set[str]] = {}
        self._old: dict[str, set[str]] = {}
        self._young_count = 0
        self._old_count = 0
        self._young_since = now
        self._rotate_at = now + ttl / 2
        self._old_until = now

    def __len__(self) -> int:
        return self._young_count + self._old_count

    def _rotate(self, now: float) -> None:
        if now - self._young_since >= self.ttl:
            # Idle for a whole TTL: even the young generation has expired.
            self._old, self._old_count = {}, 0
        else:
            self._old, self._old_count = self._young, self._young_count
        self._old_until = self._young_since + self.ttl
        self._young, self._young_count = {}, 0
        self._young_since = now
        self._rotate_at = now + self.ttl / 2

    def has(self, mirror: str, digest: str, now: float) -> bool:
        if now >= self._rotate_at:
            self._rotate(now)
        young = self._young.get(mirror)
        if young is not None and digest in young:
            return True
        if now < self._old_until:
            old = self._old.get(mirror)
            return old is not None and digest in old
        return False

    def add(self, mirror: str, digest: str, now: float) -> None:
        if self.ttl <= 0:
            return
        if now >= self._rotate_at or self._young_count >= self._half:
            self._rotate(now)
        young = self._young.get(mirror)
        if young is None:
            young = self._young[mirror] = set()
        if digest not in young:
            young.add(digest)
            self._young_count += 1

    def sizes(self) -> dict[str, int]:
        """Entries held per mirror, both generations (as `len` counts them)."""
        held: dict[str, int] = {}
        for generation in (self._young, self._old):
            for mirror, members in generation.items():
                held[mirror] = held.get(mirror, 0) + len(members)
        return held

    def discard(self, mirror: str, digest: str) -> None:
        for generation in (self._young, self._old):
            members = generation.get(mirror)
            if members is not None and digest in members:
                members.discard(digest)
                if generation is self._young:
                    self._young_count -= 1
                else:
                    self._old_count -= 1


class BlobExistenceCache:
    """Answers "is `digest` at `<mirror>/containers/images/<digest>`" (and "is this content in the
    regional upstream registry"), cheaply."""

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
        now = time.monotonic()
        self._hits = ExpiringSet(hit_ttl, size, now)
        self._misses = ExpiringSet(miss_ttl, size, now)
        # Failed checks: "not there" for a short while, counted with the misses.
        self._errors = ExpiringSet(error_ttl, size, now)
        self._in_flight: dict[tuple[str, str], asyncio.Future[bool]] = {}
        self._head_timeout = head_timeout
        self._head_concurrency = head_concurrency
        self._breaker_failures = breaker_failures
        self._breaker_cooldown = breaker_cooldown
        self._on_breaker_change = on_breaker_change
        # on_check(mirror, outcome, seconds): metrics hook, called per check.
        self._on_check = on_check
        self.breakers: dict[str, CircuitBreaker] = {}
        # (mirror, outcome) -> answers; the mirror is a configured base URL.
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_settings(
        cls, settings: Settings, on_check: Callable[[str, str, float], None] | None = None
    ) -> BlobExistenceCache:
        """The cache as `serve` configures it (and `explain`, to check as the server does)."""
        return cls(
            hit_ttl=settings.cache_hit_ttl, miss_ttl=settings.cache_miss_ttl, error_ttl=settings.cache_error_ttl,
            size=settings.cache_size, head_timeout=settings.head_timeout,
            head_concurrency=settings.head_concurrency, breaker_failures=settings.breaker_failures,
            breaker_cooldown=settings.breaker_cooldown, on_check=on_check,
        )

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

    def count(self, outcome: str) -> int:
        """Answers with `outcome`, every mirror together."""
        return sum(n for (_, seen), n in self.outcomes.items() if seen == outcome)

    @property
    def sizes(self) -> dict[str, int]:
        return {"hits": len(self._hits), "misses": len(self._misses) + len(self._errors)}

    def size_rows(self) -> list[list[object]]:
        """[[mirror, cache (hits or misses), entries]]: the caches' sizes by mirror, for metrics."""
        rows: Counter[tuple[str, str]] = Counter()
        for cache, sets in (("hits", (self._hits,)), ("misses", (self._misses, self._errors))):
            for expiring in sets:
                for mirror, entries in expiring.sizes().items():
                    rows[mirror, cache] += entries
        return [[mirror, cache, n] for (mirror, cache), n in rows.items()]

    def breaker(self, mirror: str) -> CircuitBreaker:
        breaker = self.breakers.get(mirror)
        if breaker is None:
            breaker = self.breakers[mirror] = CircuitBreaker(
                mirror, self._breaker_failures, self._breaker_cooldown, self._on_breaker_change
            )
        return breaker

    def cached(self, mirror: str, digest: str) -> bool | None:
        """The answer without any I/O, or None when a check is needed.

        Also for a registry check: (registry, key) as `check_registry` takes
        them. An open breaker answers False: the mirror is not trusted for
        now, not even for blobs it was known to hold.
        """
        now = time.monotonic()
        breaker = self.breakers.get(mirror)
        if breaker is not None and breaker.state != CLOSED:
            if not breaker.allow(now):
                self.outcomes[mirror, BREAKER_OPEN] += 1
                return False
            if breaker.state == HALF_OPEN:
                return None  # allow() just granted this request the probe: make it check
        # The hot path: a blob found in the young generation of the hits,
        # ExpiringSet.has inline.
        hits = self._hits
        if now < hits._rotate_at:
            young = hits._young.get(mirror)
            if young is not None and digest in young:
                return True
        return self._known(mirror, digest, now)

    def _known(self, mirror: str, digest: str, now: float) -> bool | None:
        if self._hits.has(mirror, digest, now):
            return True
        if self._misses.has(mirror, digest, now) or self._errors.has(mirror, digest, now):
            return False
        return None

    async def check(self, mirror: str, digest: str) -> bool:
        """Is the blob in the mirror? Uses the caches, shares in-flight HEADs."""
        return await self._check(mirror, digest, f"{mirror}/containers/images/{digest}", None)

    async def check_registry(self, registry: str, key: str, url: str) -> bool:
        """Does the registry at `registry` hold the content at `url` (a manifest or blob by digest)?

        Remembered by (registry, `key`), the route's `<name>/manifests|blobs/<digest>`:
        a registry holds content by repository. Asked with `cached(registry, key)` first,
        as for a mirror.
        """
        return await self._check(registry, key, url, _REGISTRY_HEADERS)

    async def _check(self, base: str, key: str, url: str, headers: dict[str, str] | None) -> bool:
        flight = (base, key)
        pending = self._in_flight.get(flight)
        if pending is not None:
            self.outcomes[base, COALESCED] += 1
            if self._on_check is not None:
                self._on_check(base, COALESCED, 0.0)
            return await asyncio.shield(pending)
        breaker = self.breakers.get(base)
        if breaker is None or breaker.state == CLOSED:
            # Another request's HEAD may have finished since `cached` was
            # asked (this runs in a task started after it): use its answer,
            # so a blob costs one HEAD per TTL however requests interleave.
            known = self._known(base, key, time.monotonic())
            if known is not None:
                return known
        if len(self._in_flight) >= self._head_concurrency:
            self.outcomes[base, OVER_CAPACITY] += 1
            return False
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._in_flight[flight] = future
        try:
            found = await self._head(base, key, url, headers)
        except BaseException:
            future.set_result(False)
            raise
        finally:
            del self._in_flight[flight]
        if not future.done():
            future.set_result(found)
        return found

    async def _head(self, base: str, key: str, url: str, headers: dict[str, str] | None) -> bool:
        if not _client_imported.is_set():
            # The first HEAD of the process: the client's import (about
            # 0.1 s) runs in a thread, so the loop goes on answering others.
            await asyncio.to_thread(_import_client)
        import aiohttp

        session = self._session if self._session is not None else self._open_session()
        started = time.monotonic()
        try:
            async with session.head(url, allow_redirects=False, headers=headers) as response:
                status = response.status
        except TimeoutError:
            outcome = TIMEOUT
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            log.debug("HEAD %s failed: %r", url, exc)
            outcome = ERROR
        else:
            outcome = head_outcome(status, headers is not None)
        now = time.monotonic()
        self.breaker(base).record(outcome in _ANSWERED, now)
        self.outcomes[base, outcome] += 1
        if self._on_check is not None:
            self._on_check(base, outcome, now - started)
        if outcome == HIT:
            self._misses.discard(base, key)
            self._errors.discard(base, key)
            self._hits.add(base, key, now)
            return True
        self._hits.discard(base, key)
        (self._errors if outcome in _FAILED else self._misses).add(base, key, now)
        return False


def client_imported() -> bool:
    """Has aiohttp's client been imported (by `warm_client` or a first HEAD)?"""
    return _client_imported.is_set()


def warm_client() -> None:
    """Import aiohttp's client in a thread, so the first HEAD does not wait for it."""
    global _warming
    _warming = threading.Thread(target=_import_client, name="archeio-warm-client", daemon=True)
    _warming.start()


def finish_warming(timeout: float = 5.0) -> None:
    """Wait for `warm_client`'s import to end, if it runs: a stop right after start-up must not finalize
    the interpreter under a thread that is still importing (a daemon thread then may crash the exit)."""
    if _warming is not None:
        _warming.join(timeout)


_warming: threading.Thread | None = None


_importing = threading.Lock()
_client_imported = threading.Event()


def _import_client() -> None:
    with _importing:  # the warming thread and a first HEAD may both get here
        if _client_imported.is_set():
            return
        # The import holds the GIL for most of its 0.1 s: hand it back to
        # the event loop's thread more often meanwhile.
        interval = sys.getswitchinterval()
        sys.setswitchinterval(0.0005)
        try:
            import aiohttp  # noqa: F401
        finally:
            sys.setswitchinterval(interval)
        _client_imported.set()
